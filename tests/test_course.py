"""experiments.course on generated data: runs each recipe once, writes the table, lists a
study without data as skipped, and reads finished runs back on a rerun."""
import json

import pytest

from experiments import course


def _course(workdir, *args):
  with pytest.raises(SystemExit) as exit_:
    course.cli(["course", "--workdir", str(workdir), *args])
  return exit_.value.code


@pytest.mark.slow
def test_course_runs_its_studies_and_writes_the_table(tmp_path, npz_path, monkeypatch, capsys):
  quick = (("data.source", npz_path), ("data.limit", 96), ("batch_size", 16),
           ("eval_batch_size", 32))
  monkeypatch.setattr(course, "STUDIES", (
      course.Study("Seed", "seed", "SeedCNN", "50%", course.Recipe("runlocal", quick),
                   course.Recipe("runlocal", quick + (("schedule.name", "one_cycle"),))),
      course.Study("R", "missing", "no data", "-",
                   course.Recipe("runlocal", (("data.source", str(tmp_path / "nothing.npz")),))),
  ))
  assert _course(tmp_path / "c", "--quick") == 0
  result = json.loads((tmp_path / "c" / "course.json").read_text())
  seed, missing = result["studies"]
  assert result["quick"] and 0 <= seed["course"]["accuracy"] <= 1
  assert (tmp_path / "c" / "seed" / "course-quick" / "test_metrics.json").is_file()
  assert (tmp_path / "c" / "seed" / "improved-quick" / "curves.png").is_file()
  assert "schedule.name=one_cycle" in seed["improved"]["command"]
  assert missing["course"]["skipped"].startswith("data file") and missing["improved"] is None
  md = (tmp_path / "c" / "course.md").read_text()
  assert "| Seed | `seed`: SeedCNN | 50% | " in md and "skipped (below)" in md
  assert "- `missing`: data file" in md
  assert f"{100 * seed['course']['accuracy']:.1f}%" in md
  assert f"Measured on {seed['course']['measured']}." in md and " cores, jax " in md
  capsys.readouterr()
  assert _course(tmp_path / "c", "--quick", "--only", "seed") == 0  # read back, not retrained
  assert "Epoch 1/" not in capsys.readouterr().out
  again = json.loads((tmp_path / "c" / "course.json").read_text())["studies"]
  assert again == result["studies"]  # the study not rerun is kept, the wall times too


def test_unknown_study_is_one_clear_error(tmp_path, capsys):
  assert _course(tmp_path / "c", "--only", "nope") == 2
  assert "--only: unknown studies ['nope']; expected some of" in capsys.readouterr().err
