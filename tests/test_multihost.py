"""Two processes on localhost (2 CPU devices each, gloo collectives), started as on two
machines with --coordinator_address/--num_processes/--process_id, train the CIFAR
experiment: SIGTERM to one of them stops both after the same step with a checkpoint, the
pair resumes from it, and both end with the params of an uninterrupted 1-process run."""
import json

import portpicker
import pytest

from tests import scaleout
from tests.scaleout import end_runs, xla_cache  # noqa: F401  (fixtures)

pytestmark = [pytest.mark.usefixtures("end_runs"), pytest.mark.slow]  # subprocesses

# No augmentation: each process draws its own, so only without it do 2 processes match 1.
FLAGS = ["--config", "experiments/configs/runlocal.py", "--config.data.augment.crop_padding=0",
         "--config.data.augment.horizontal_flip=False", "--config.num_epochs=4"]
STEPS_PER_EPOCH = 9  # runlocal on 192 training images: (192 - 38 validation) // 16


@pytest.fixture(scope="module")
def npz(tmp_path_factory):
  return scaleout.write_npz(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def single(tmp_path_factory, xla_cache, npz):
  """What one process on one device ends with, and its test metrics: the reference."""
  return scaleout.train(tmp_path_factory.mktemp("single"), xla_cache,
                        [*FLAGS, f"--config.data.source={npz}"])


def _start_pair(tmp, xla_cache, npz, name, sigterm_at: int = 0) -> list[scaleout.Run]:
  """Two processes of one run; ``sigterm_at`` > 0: process 1 gets SIGTERM in that step."""
  address = f"localhost:{portpicker.pick_unused_port()}"
  stops = [{}, {"CNNJAX_TEST_SIGTERM_AT_STEP": str(sigterm_at)} if sigterm_at else {}]
  return [scaleout.Run(tmp / f"{name}{i}", [
      "cli", *FLAGS, f"--config.data.source={npz}", "--workdir", str(tmp / "w"),
      f"--coordinator_address={address}", "--num_processes=2", f"--process_id={i}"],
      scaleout.env(xla_cache, devices=2, CNNJAX_TEST_DUMP=str(tmp / name), **stops[i]))
      for i in range(2)]


def test_two_processes_stop_together_resume_and_train_like_one(tmp_path, xla_cache, npz, single):
  reference, reference_metrics = single
  # A preemption notice that reaches one machine, in epoch 2 (in the process itself: a
  # signal sent from here raced the run's end once its steps got faster).
  pair = _start_pair(tmp_path, xla_cache, npz, "stopped", sigterm_at=STEPS_PER_EPOCH + 3)
  assert [run.wait() for run in pair] == [130, 130], pair[0].stderr + pair[1].stderr
  assert "SIGTERM: saving a checkpoint" in pair[1].stdout
  stopped = [scaleout.load(tmp_path / f"stopped/process{i}.npz") for i in range(2)]
  assert stopped[0]["step"] == stopped[1]["step"]  # both stopped after the same step...
  step = int(stopped[0]["step"])
  assert STEPS_PER_EPOCH < step < 4 * STEPS_PER_EPOCH
  assert (tmp_path / f"w/checkpoints/{step}").is_dir()  # ...and saved it together

  pair = _start_pair(tmp_path, xla_cache, npz, "resumed")
  for run in pair:
    assert run.wait() == 0, run.stderr
  assert f"Resumed from {tmp_path / 'w/checkpoints'}/{step}" in pair[0].stdout
  dumps = [scaleout.load(tmp_path / f"resumed/process{i}.npz") for i in range(2)]
  trained = scaleout.trained(reference)
  for dump in dumps:
    assert dump["mesh_size"] == 4 and dump["process_count"] == 2
    assert dump["step"] == reference["step"] == 4 * STEPS_PER_EPOCH
    scaleout.assert_trees_close(dump, reference, trained, tol=1e-5)
  scaleout.assert_trees_close(dumps[1], dumps[0], trained, tol=0)  # the very same params
  # Only process 0 reports and writes the logs.
  assert "Epoch 4/4" in pair[0].stdout and "Test |" in pair[0].stdout
  assert "Epoch" not in pair[1].stdout and "Test" not in pair[1].stdout
  metrics = json.loads((tmp_path / "w/test_metrics.json").read_text())
  assert metrics["test_loss"] == pytest.approx(reference_metrics["test_loss"], rel=1e-5)
  assert metrics["confusion_matrix"] == reference_metrics["confusion_matrix"]
  rows = [json.loads(line) for line in (tmp_path / "w/metrics.jsonl").read_text().splitlines()]
  assert [r["epoch"] for r in rows] == [1, 2, 3, 4]
