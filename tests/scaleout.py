"""Subprocess helpers for the scale-out tests (test_parallel, test_multihost, test_checkpoint).

JAX fixes its device count and its process group when it starts, so runs on 8 fake CPU
devices or in several processes happen in subprocesses (``python -m tests.worker ...``).
They share a persistent compilation cache and inherit the suite's LLVM -O1 (tests/conftest.py;
-O0 was seen to give NaNs), so each run costs little beyond its imports.
"""
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.conftest import make_images

ROOT = pathlib.Path(__file__).resolve().parent.parent
TIMEOUT = 240  # seconds for one run, generous for a loaded 2-core machine


def env(cache_dir: pathlib.Path, devices: int = 1, **extra: str) -> dict[str, str]:
  """The environment of a subprocess with ``devices`` CPU devices; ``extra`` variables added."""
  flags = os.environ.get("XLA_FLAGS", "")  # cnnjax's defaults and -O1 (tests/conftest.py)
  flags += f" --xla_force_host_platform_device_count={devices}"
  return {**os.environ, "XLA_FLAGS": flags.strip(), "JAX_COMPILATION_CACHE_DIR": str(cache_dir),
          "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", **extra}


class Run:
  """A ``python -m tests.worker ...`` subprocess with its stdout and stderr in files."""
  started: list["Run"] = []

  def __init__(self, log: pathlib.Path, args: list[str], environ: dict[str, str]):
    self.log = log
    with open(f"{log}.out", "w") as out, open(f"{log}.err", "w") as err:
      self.proc = subprocess.Popen([sys.executable, "-m", "tests.worker", *args], cwd=ROOT,
                                   env=environ, stdout=out, stderr=err)
    Run.started.append(self)

  @property
  def stdout(self) -> str:
    return pathlib.Path(f"{self.log}.out").read_text()

  @property
  def stderr(self) -> str:
    return pathlib.Path(f"{self.log}.err").read_text()

  def wait_until(self, condition, what: str) -> None:
    """Polls ``condition()`` until true; fails if the process ends or time runs out first."""
    deadline = time.monotonic() + TIMEOUT
    while not condition():
      assert self.proc.poll() is None, (
          f"ended (status {self.proc.returncode}) before {what}: {self.stderr}")
      assert time.monotonic() < deadline, f"no {what} after {TIMEOUT}s: {self.stderr}"
      time.sleep(0.05)

  def signal(self, signum: signal.Signals) -> None:
    self.proc.send_signal(signum)

  def wait(self) -> int:
    try:
      return self.proc.wait(TIMEOUT)
    except subprocess.TimeoutExpired:
      self.proc.kill()
      raise


@pytest.fixture(scope="module")
def xla_cache(tmp_path_factory) -> pathlib.Path:
  """The compilation cache all the runs of a pytest session share."""
  path = tmp_path_factory.getbasetemp() / "xla_cache"
  path.mkdir(exist_ok=True)
  return path


@pytest.fixture
def end_runs():
  """Kills the runs a test started and left running (a failed test's other process)."""
  yield
  while Run.started:
    run = Run.started.pop()
    if run.proc.poll() is None:
      run.proc.kill()
      run.proc.wait()


def run(log: pathlib.Path, args: list[str], environ: dict[str, str]) -> Run:
  """Runs to the end; fails with its stderr unless it exits with status 0."""
  r = Run(log, args, environ)
  assert r.wait() == 0, r.stderr
  return r


def train(tmp: pathlib.Path, cache_dir: pathlib.Path, flags: list[str]) -> tuple[dict, dict]:
  """Runs the experiment in one process on one device, in workdir ``tmp/w``, to the end.

  Returns:
    What ``fit`` ended with (``worker.flat`` names: ``params/...``, ``step``, ...) and
    the test metrics.
  """
  run(tmp / "run", ["cli", *flags, "--workdir", str(tmp / "w")],
      env(cache_dir, CNNJAX_TEST_DUMP=str(tmp / "dump")))
  return load(tmp / "dump/process0.npz"), json.loads((tmp / "w/test_metrics.json").read_text())


def trained(dump: dict[str, np.ndarray]) -> list[str]:
  """The names of the params and batch statistics in a dump."""
  return [k for k in dump if k.startswith(("params/", "batch_stats/"))]


def write_npz(directory: pathlib.Path) -> pathlib.Path:
  """A CIFAR-shaped .npz of 192 train and 64 test images (as conftest's ``npz_path``)."""
  x_train, y_train = make_images(192, seed=1)
  x_test, y_test = make_images(64, seed=2)
  path = directory / "tiny_cifar.npz"
  np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
  return path


def load(path: pathlib.Path) -> dict[str, np.ndarray]:
  with np.load(path) as f:
    return dict(f)


def assert_trees_close(a: dict[str, np.ndarray], b: dict[str, np.ndarray], keys,
                       tol: float) -> None:
  """Every array named in ``keys`` finite and ``|a - b| <= tol * (1 + |b|)`` in ``a`` and ``b``."""
  keys = sorted(keys)
  assert keys
  for k in keys:
    assert np.isfinite(a[k]).all(), k
    np.testing.assert_allclose(a[k], b[k], rtol=tol, atol=tol, err_msg=k)
