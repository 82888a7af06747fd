"""Checkpoints: the latest and the best kept together, restores onto a mesh of another size,
and runs that are killed or stopped by SIGTERM resume to the uninterrupted result."""
import json
import re
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnnjax import parallel
from cnnjax.checkpoint import Checkpoints
from cnnjax.errors import UserError
from tests import scaleout, worker
from tests.scaleout import end_runs, xla_cache  # noqa: F401  (fixtures)

pytestmark = [pytest.mark.usefixtures("end_runs"), pytest.mark.slow]  # subprocesses

FLAGS = ["--config", "experiments/configs/runlocal.py", "--config.num_epochs=6"]  # crop + flip on
STEPS_PER_EPOCH = 9  # runlocal on 192 training images: (192 - 38 validation) // 16


def _steps(directory) -> list[int]:
  return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


def test_two_latest_and_best_are_kept_together(tmp_path):
  checkpoints = Checkpoints(tmp_path)
  for step, val_loss in [(1, 1.0), (2, 0.5), (3, 0.9), (4, 0.8)]:
    checkpoints.save(step, {"w": jnp.full(3, step)}, {"val_loss": val_loss})
  checkpoints.wait()
  # The newest two (3, 4) survive although their losses are worse than the best (2); 1 goes.
  assert _steps(tmp_path) == [2, 3, 4]
  assert (checkpoints.best_step(), checkpoints.latest_step()) == (2, 4)
  assert int(checkpoints.restore(2, {"w": jnp.zeros(3, jnp.int32)})["w"][0]) == 2
  checkpoints.close()

  checkpoints = Checkpoints(tmp_path)  # a resumed run reads the metrics back from disk
  assert (checkpoints.best_step(), checkpoints.latest_step()) == (2, 4)
  checkpoints.save(5, {"w": jnp.full(3, 5)})  # an interrupted run: no metric
  checkpoints.wait()
  assert _steps(tmp_path) == [2, 4, 5] and checkpoints.best_step() == 2
  checkpoints.save(6, {"w": jnp.full(3, 6)}, {"val_loss": 0.4})
  checkpoints.wait()
  assert _steps(tmp_path) == [5, 6] and checkpoints.best_step() == 6
  with pytest.raises(UserError, match=r"checkpoint .*/6 does not match this model/optimizer"):
    checkpoints.restore(6, {"v": jnp.zeros(3)})
  checkpoints.close()


def _values(abstract):
  """Random values of the shapes and dtypes in ``abstract`` (with step 7)."""
  rng = np.random.default_rng(0)
  values = jax.tree.map(lambda a: rng.standard_normal(a.shape).astype(a.dtype)
                        if jnp.issubdtype(a.dtype, jnp.floating)
                        else rng.integers(0, 1000, a.shape).astype(a.dtype), abstract)
  return values.replace(step=np.asarray(7, abstract.step.dtype))


def test_restores_across_device_counts_both_ways(tmp_path, xla_cache):
  # Written on this process's single device...
  one = parallel.replicated(parallel.make_mesh())
  abstract = worker.abstract_state(one)
  written = jax.device_put(_values(abstract), one)
  checkpoints = Checkpoints(tmp_path / "one")
  checkpoints.save(7, written)
  checkpoints.wait()
  checkpoints.close()
  # ...restored onto 8 devices, changed there and written back...
  scaleout.run(tmp_path / "reshard",
               ["reshard", str(tmp_path / "one"), str(tmp_path / "eight"), str(tmp_path / "on8.npz")],
               scaleout.env(xla_cache, devices=8))
  on8 = scaleout.load(tmp_path / "on8.npz")
  assert list(on8.pop("devices")) == [8]
  scaleout.assert_trees_close(on8, worker.flat(jax.device_get(written)), on8, tol=0)
  # ...and restored from 8 devices onto 1, from an abstract target.
  checkpoints = Checkpoints(tmp_path / "eight")
  assert checkpoints.latest_step() == 8
  back = checkpoints.restore(8, abstract)
  checkpoints.close()
  assert {x.sharding for x in jax.tree.leaves(back)} == {one}
  expected = jax.device_get(written)
  expected = expected.replace(step=expected.step + 1,
                              params=jax.tree.map(lambda p: p * 2, expected.params))
  expected = worker.flat(expected)
  scaleout.assert_trees_close(worker.flat(back), expected, expected, tol=0)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, xla_cache):
  tmp = tmp_path_factory.mktemp("uninterrupted")
  npz = scaleout.write_npz(tmp)
  return (npz, *scaleout.train(tmp, xla_cache, [*FLAGS, f"--config.data.source={npz}"]))


def test_killed_and_stopped_runs_resume_to_the_uninterrupted_result(tmp_path, xla_cache,
                                                                    uninterrupted):
  npz, reference, reference_metrics = uninterrupted
  workdir = tmp_path / "w"
  args = ["cli", *FLAGS, f"--config.data.source={npz}", "--workdir", str(workdir)]
  environ = scaleout.env(xla_cache, CNNJAX_TEST_DUMP=str(tmp_path / "dump"))

  # kill -9 once the first epoch's checkpoint is on disk (orbax renames it into place).
  run = scaleout.Run(tmp_path / "killed", args, environ)
  run.wait_until(lambda: (workdir / f"checkpoints/{STEPS_PER_EPOCH}").is_dir(), "a checkpoint")
  run.signal(signal.SIGKILL)
  assert run.wait() == -signal.SIGKILL
  last = _steps(workdir / "checkpoints")[-1]

  # It resumes from its last checkpoint; SIGTERM (sent by the process itself: from here it
  # could race the run's end) once it has trained an epoch more.
  run = scaleout.Run(tmp_path / "stopped", args,
                     {**environ, "CNNJAX_TEST_SIGTERM_AT_STEP": str(STEPS_PER_EPOCH + 2)})
  assert run.wait() == 130, run.stderr
  assert f"Resumed from {workdir / 'checkpoints'}/{last} " in run.stdout
  assert "SIGTERM: saving a checkpoint, then stopping" in run.stdout
  stopped = int(re.findall(r"Epoch (\d)/6", run.stdout)[-1]) * STEPS_PER_EPOCH
  step = _steps(workdir / "checkpoints")[-1]
  assert stopped < step < 6 * STEPS_PER_EPOCH  # saved where it stopped, after that epoch

  # The second resume finishes with the params of the run that was never interrupted.
  run = scaleout.run(tmp_path / "finished", args, environ)
  assert f"Resumed from {workdir / 'checkpoints'}/{step} " in run.stdout
  dump = scaleout.load(tmp_path / "dump/process0.npz")
  assert dump["step"] == reference["step"] == 6 * STEPS_PER_EPOCH
  scaleout.assert_trees_close(dump, reference, scaleout.trained(reference), tol=0)
  metrics = json.loads((workdir / "test_metrics.json").read_text())
  assert metrics["test_loss"] == reference_metrics["test_loss"]
  assert metrics["confusion_matrix"] == reference_metrics["confusion_matrix"]
