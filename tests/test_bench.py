"""Smoke test of ``python -m experiments.bench --input`` on generated data, tiny windows."""
import numpy as np
from PIL import Image

from experiments import bench


def test_input_mode_prints_and_appends_a_table(tmp_path, npz_path, capsys):
  rng = np.random.default_rng(0)
  for c in ("a", "b"):
    (tmp_path / "folder" / c).mkdir(parents=True)
    for i in range(3):
      Image.fromarray(rng.integers(0, 256, (40, 30, 3), np.uint8)).save(
          tmp_path / "folder" / c / f"{i}.png")
  out = tmp_path / "BENCH.md"
  out.write_text("# Benchmarks\n\n")
  bench.main(["--input", "--source", str(npz_path), "--folder", str(tmp_path / "folder"),
              "--step_model", "mlp", "--batch_sizes", "8", "--folder_batch_size", "2", "--workers", "0",
              "--windows", "2", "--window_seconds", "0.01", "--warmup_seconds", "0",
              "--out", str(out)])
  text = out.read_text()
  assert text.startswith("# Benchmarks\n\n## Input pipelines vs the mlp train step: ")
  assert "`python -m experiments.bench --input --source " in text
  rows = [line for line in text.splitlines() if line.startswith("| ") and "---" not in line]
  assert len(rows) == 1 + 4  # header; crop + flip, Keras set, folder, train step
  assert rows[1].startswith("| CIFAR-10 crop + flip | 8 | in-process | ")
  assert rows[2].startswith("| CIFAR-10 Keras set | 8 | in-process | ")
  assert "/folder decode + resized crop 224 + flip | 2 | in-process | " in rows[3]
  assert rows[4].startswith("| mlp train step (synthetic) | 8 | - | ")
  assert "- batch 8: CIFAR-10 crop + flip pipeline / mlp train step (synthetic) = " in text
  assert "appended to" in capsys.readouterr().out
