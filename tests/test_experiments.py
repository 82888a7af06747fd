"""The experiment commands end to end: a one-step CIFAR run on TFDS mock data, and the
one-line errors of the command line."""
import json
import os
import subprocess
import sys

import pytest
import tensorflow_datasets as tfds
from PIL import Image

from cnnjax import config as config_lib, models, train
from experiments import entry
from tests.conftest import event_records

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
@pytest.mark.parametrize("config_file", ["cifar_seed", "cifar_bn"])
def test_cifar_config_runs_one_step_on_tfds_mock_data(tmp_path, config_file):
  config = entry.load_config_file(os.path.join(ROOT, f"experiments/configs/{config_file}.py"))
  assert config.data.source == "cifar10"
  config.num_epochs = 1
  config.batch_size = 16
  config.eval_batch_size = 16
  config.data.val_size = 16.0
  with tfds.testing.mock_data(num_examples=32):
    result = train.train_and_evaluate(config, tmp_path)
  rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert rows[0]["step"] == 1  # 16 training examples, batch 16
  assert result["count"] == 32 and 0.0 <= result["accuracy"] <= 1.0
  assert (tmp_path / "predictions.png").stat().st_size > 0


CONFIGS = sorted(name[:-3] for name in os.listdir(os.path.join(ROOT, "experiments/configs"))
                 if name.endswith(".py") and name not in ("__init__.py", "transfer_base.py"))


@pytest.mark.parametrize("config_file", CONFIGS)
def test_every_config_loads_and_names_a_model_that_builds(config_file):
  config = entry.load_config_file(os.path.join(ROOT, f"experiments/configs/{config_file}.py"))
  assert models.model_from_config(config.model) is not None


def _run(*args, cwd=ROOT):
  return subprocess.run([sys.executable, "-m", "experiments.train", *args], cwd=cwd,
                        capture_output=True, text=True, timeout=300)


def _assert_one_line_error(proc, pattern):
  assert proc.returncode == 2, proc.stderr
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
  assert pytest.importorskip("re").search(pattern, lines[0]), lines[0]


END_PROCESS = """
import atexit, concurrent.futures, pathlib, sys, threading, time
from experiments import entry
out = pathlib.Path(sys.argv[1])
def later(name):
  time.sleep(0.3)
  (out / name).write_text(name)
threading.Thread(target=later, args=("thread",)).start()
pool = concurrent.futures.ThreadPoolExecutor(1)
pool.submit(later, "pool")
atexit.register(lambda: (out / "atexit").write_text("atexit"))
print("unflushed", end="")
entry.end_process(3)
print("not reached")
"""


def test_end_process_finishes_what_a_normal_exit_finishes(tmp_path):
  """Threads, a thread pool's work, ``atexit`` handlers and buffered stdout, then the status."""
  proc = subprocess.run([sys.executable, "-c", END_PROCESS, str(tmp_path)], cwd=ROOT,
                        capture_output=True, text=True, timeout=60)
  assert (proc.returncode, proc.stdout, proc.stderr) == (3, "unflushed", "")
  assert sorted(p.name for p in tmp_path.iterdir()) == ["atexit", "pool", "thread"]


@pytest.mark.slow
def test_the_train_command_ends_with_everything_written(tmp_path, npz_path):
  """``python -m experiments.train`` ends its process without the interpreter's teardown
  (``entry.end_process``): exit status 0, the test line last, every file whole, and a rerun
  finds the run finished."""
  workdir = tmp_path / "run"
  args = ("--config", "experiments/configs/runlocal.py", "--workdir", str(workdir),
          f"--config.data.source={npz_path}", "--config.num_epochs=1")
  proc = _run(*args)
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.splitlines()[-1].startswith("Test | loss "), proc.stdout
  result = json.loads((workdir / "test_metrics.json").read_text())
  assert result["count"] == 64
  assert [json.loads(line)["epoch"] for line in
          (workdir / "metrics.jsonl").read_text().splitlines()] == [1]
  for name in ("curves.png", "confusion.png", "predictions.png"):
    with Image.open(workdir / name) as image:
      image.load()  # raises on a truncated PNG
  tags = {v.tag for e in event_records(workdir) for v in e.summary.value}
  assert {"test/accuracy", "predictions"} <= tags  # the last events, framed and checked
  rerun = _run(*args)
  assert rerun.returncode == 0, rerun.stderr
  assert json.loads((workdir / "test_metrics.json").read_text()) == result


@pytest.mark.slow
def test_every_config_key_has_its_line_of_meaning():
  # what --help prints beside each key's default; no line for a key that does not exist
  assert set(config_lib.flat(config_lib.default_config())) == set(config_lib.DOCS)


def test_cli_errors_are_one_line(tmp_path, npz_path):
  base = ["--config", "experiments/configs/runlocal.py", "--workdir", str(tmp_path / "w")]
  _assert_one_line_error(_run(*base, "--config.optimizer.lrr=3"),
                         r"unknown config key 'optimizer.lrr'; keys in optimizer: \[.*'lr'")
  _assert_one_line_error(_run(*base, "--config.batch_size=abc"), r"bad value 'abc' for --config.batch_size")
  _assert_one_line_error(_run("--config", "experiments/configs/nope.py", "--workdir", "w"),
                         r"config file experiments/configs/nope.py not found")
  hymenoptera = ["--config", "experiments/configs/hymenoptera.py:efficientnet_lite0,frozen"]
  _assert_one_line_error(_run(*hymenoptera, "--workdir", "w", "--config.optimizer.lrr=3"),
                         r"unknown config key 'optimizer.lrr'")
  _assert_one_line_error(_run("--config", "experiments/configs/hymenoptera.py:vgg19,frozen",
                              "--workdir", "w"),
                         r"config file experiments/configs/hymenoptera.py:vgg19,frozen: "
                         r"config argument 'vgg19,frozen'; expected")
  _assert_one_line_error(_run(*base, f"--config.data.source={tmp_path}/missing.npz"),
                         r"data file .*missing.npz not found; .*point --config.data.source at local data")
  _assert_one_line_error(_run(*base, f"--config.data.source={npz_path}", "--config.model.name=resnet9"),
                         r"unknown model 'resnet9'; expected one of \[")
  _assert_one_line_error(_run(*base, f"--config.data.source={npz_path}", "--config.optimizer.name=adagrad"),
                         r"unknown optimizer 'adagrad'")


@pytest.mark.slow
def test_mnist_config_runs_from_a_folder_of_idx_files(tmp_path):
  """Fashion-MNIST is distributed as idx files, like MNIST: a folder of them is a source."""
  from cnnjax.data import idx
  from tests.conftest import make_images
  folder = tmp_path / "fashion_mnist"
  folder.mkdir()
  for prefix, n, seed in (("train", 80, 1), ("t10k", 20, 2)):
    images, labels = make_images(n, shape=(28, 28, 1), seed=seed)
    idx.write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", images[..., 0])
    idx.write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", labels)
  config = entry.load_config_file(os.path.join(ROOT, "experiments/configs/lenet.py"))
  config.data.source = str(folder)
  config.num_epochs = 1
  config.batch_size = 16
  config.eval_batch_size = 20
  result = train.train_and_evaluate(config, tmp_path / "run")
  assert result["count"] == 20 and result["count_rotated"] == 20
  assert 0.0 <= result["accuracy_rotated"] <= 1.0
