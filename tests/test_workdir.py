"""Nothing a run wrote is lost: the workdir lock, resume only of the same run, a finished run
left alone, ``new_run`` setting the earlier run aside, damaged checkpoints skipped, temporary
checkpoint directories cleaned, a full disk ending in one line."""
import json
import os
import pathlib
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from cnnjax import assemble, steps, train, workdir
from cnnjax.checkpoint import Checkpoints
from cnnjax.errors import UserError
from tests.conftest import stop_at_step, tiny_config


def _snapshot(root: pathlib.Path) -> dict[str, bytes]:
  return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_a_second_run_in_a_locked_workdir_is_refused_naming_the_first(tmp_path):
  holder = subprocess.Popen(
      [sys.executable, "-c", "import sys, time; from cnnjax import workdir\n"
       "with workdir.Lock(sys.argv[1]):\n  print('locked', flush=True); time.sleep(60)",
       str(tmp_path)], stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(UserError, match=rf"is in use by another run \(pid {holder.pid} on "):
      with workdir.Lock(tmp_path):
        pass
  finally:
    holder.kill()
    holder.wait()
  with workdir.Lock(tmp_path) as lock:  # killed (kill -9): its lock is free and taken over
    assert lock.taken_over["pid"] == holder.pid
  with workdir.Lock(tmp_path) as lock:  # ended normally: nothing to take over
    assert lock.taken_over is None


def test_a_lock_that_wrote_nothing_leaves_no_workdir(tmp_path):
  with pytest.raises(RuntimeError):
    with workdir.Lock(tmp_path / "new"):
      raise RuntimeError("the run failed before writing anything")
  assert not (tmp_path / "new").exists()


def test_a_workdir_that_is_a_file_is_one_clear_error(tmp_path):
  (tmp_path / "file").write_text("x")
  with pytest.raises(UserError, match="--workdir .*file is a file; expected a directory"):
    workdir.Lock(tmp_path / "file")


def test_compare_leaves_out_keys_that_do_not_change_the_trajectory(npz_path):
  a = tiny_config(npz_path)
  b = tiny_config(npz_path, batch_size=8, num_epochs=3, eval_batch_size=7, log_every_steps=3)
  assert workdir.compare(a, b) == ["batch_size: 32 -> 8", "num_epochs: 2 -> 3"]
  assert workdir.compare(a, tiny_config(npz_path)) == []


@pytest.mark.slow
def test_rerun_refuses_another_config_leaves_a_finished_run_alone_and_new_run_sets_it_aside(
    npz_path, tmp_path):
  run = tmp_path / "run"
  config = tiny_config(npz_path, num_epochs=1)
  first = train.train_and_evaluate(config, run)
  before = _snapshot(run)
  with pytest.raises(UserError, match=r"holds a different run \(batch_size: 32 -> 16; "
                                      r"num_epochs: 1 -> 3\); .* or --new_run"):
    train.train_and_evaluate(tiny_config(npz_path, batch_size=16, num_epochs=3), run)
  assert _snapshot(run) == before  # refused before anything was written
  assert train.train_and_evaluate(config, run) == first  # finished: nothing to do
  assert _snapshot(run) == before
  second = train.train_and_evaluate(tiny_config(npz_path, num_epochs=2), run, new_run=True)
  assert second["count"] == first["count"]
  kept = _snapshot(run / "previous" / "1")
  assert kept == {k: v for k, v in before.items() if k != workdir.LOCK}
  rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
  assert [r["epoch"] for r in rows] == [1, 2]


@pytest.mark.slow
def test_a_damaged_latest_checkpoint_is_set_aside_and_the_run_resumes_from_the_one_before(
    npz_path, tmp_path, monkeypatch, capsys):
  run = tmp_path / "run"
  config = tiny_config(npz_path, num_epochs=2)
  real_create = steps.Runner.create
  stop_at_step(monkeypatch, 6)  # in epoch 2: checkpoints 4 (epoch 1) and 6 (no metric)
  assert train.train_and_evaluate(config, run) == {"interrupted": True, "step": 6}
  monkeypatch.setattr(steps.Runner, "create", real_create)
  assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["4", "6"]
  for f in (run / "checkpoints/6/default").rglob("d/*"):
    f.write_bytes(f.read_bytes()[:10])  # truncated array data
  report_run = assemble.restore(run, "latest")  # as `experiments.report --which=latest`
  assert int(report_run.state.step) == 4 and "checkpoints/6 cannot be read" in report_run.notes[-1]
  assert (run / "checkpoints/6").is_dir()  # a report moves nothing
  capsys.readouterr()
  result = train.train_and_evaluate(config, run)
  out = capsys.readouterr().out
  assert "checkpoints/6 cannot be read" in out and "set aside in" in out
  assert "checkpoints/4 (epoch 2, batch 0)" in out
  assert (run / "corrupt_checkpoints/6").is_dir() and result["count"] == 64
  rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
  assert [r["epoch"] for r in rows] == [1, 2]


def test_restore_intact_skips_a_damaged_checkpoint_and_says_so(tmp_path):
  state = {"w": jnp.arange(100.0), "b": jnp.ones(3)}
  ckpt = Checkpoints(tmp_path / "checkpoints")
  ckpt.save(1, state, {"val_loss": 1.0})
  ckpt.save(2, {"w": state["w"] * 2, "b": state["b"] * 2}, {"val_loss": 2.0})
  ckpt.wait()
  ckpt.close()
  (tmp_path / "checkpoints/2/default/_METADATA").write_text("")
  ckpt = Checkpoints(tmp_path / "checkpoints")
  step, restored, skipped = ckpt.restore_intact(state, set_aside=True)
  assert step == 1 and np.array_equal(restored["w"], state["w"])
  assert len(skipped) == 1 and "checkpoints/2 cannot be read" in skipped[0]
  assert ckpt.latest_step() == 1 and (tmp_path / "corrupt_checkpoints/2").is_dir()
  ckpt.close()
  for f in (tmp_path / "checkpoints/1/default").rglob("d/*"):
    f.write_bytes(f.read_bytes()[:10])
  ckpt = Checkpoints(tmp_path / "checkpoints")
  with pytest.raises(UserError, match="checkpoints/1 cannot be read .*no intact checkpoint"):
    ckpt.restore_intact(state)
  ckpt.close()


def test_leftover_temporary_checkpoint_directories_are_removed(tmp_path):
  tmp = tmp_path / "checkpoints" / "3.orbax-checkpoint-tmp"
  tmp.mkdir(parents=True)
  (tmp / "half-written").write_text("x")
  ckpt = Checkpoints(tmp_path / "checkpoints")  # removed (in the background) before a save
  ckpt.save(1, {"w": jnp.ones(3)})
  ckpt.wait()
  ckpt.close()
  assert not tmp.exists() and (tmp_path / "checkpoints/1").is_dir()


@pytest.fixture
def small_disk(tmp_path):
  """A 3 MB tmpfs at ``tmp_path/disk`` (skipped where mounting is not allowed)."""
  disk = tmp_path / "disk"
  disk.mkdir()
  if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs",
                                          str(disk)], capture_output=True).returncode:
    pytest.skip("cannot mount a small tmpfs here")
  yield disk
  subprocess.run(["umount", "-l", str(disk)], check=True)


def test_a_full_disk_ends_in_one_line_with_the_earlier_checkpoint_intact(small_disk):
  small = {"w": jnp.arange(1000.0)}
  ckpt = Checkpoints(small_disk / "checkpoints")
  ckpt.save(1, small, {"val_loss": 1.0})
  ckpt.wait()
  noise = np.random.default_rng(0).random(2_000_000, dtype=np.float32)  # 8 MB, incompressible
  with pytest.raises(UserError, match="no space left on the device of .*checkpoints: .* the "
                                      "earlier checkpoints are intact"):
    ckpt.save(2, {"w": jnp.asarray(noise)}, {"val_loss": 0.5})
    ckpt.wait()
  ckpt.close()
  ckpt = Checkpoints(small_disk / "checkpoints")
  step, restored, _ = ckpt.restore_intact(small)
  assert step == 1 and np.array_equal(restored["w"], small["w"])
  ckpt.close()


def test_a_read_only_workdir_is_one_clear_error(small_disk, npz_path):
  (small_disk / "run").mkdir()
  subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
  with pytest.raises(UserError, match=r"cannot write to --workdir .*run \(Read-only file system\)"):
    train.train_and_evaluate(tiny_config(npz_path), small_disk / "run")
