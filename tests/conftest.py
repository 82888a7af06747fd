"""Shared fixtures: small generated datasets; nothing here needs ../shared or the network.

The test process starts as the commands do (``experiments.entry``): cnnjax's XLA:CPU flags
before JAX starts, and ``runtime.configure()`` choosing oneDNN's kernels where they build.
Compiling dominates the suite's time, so tests (and the commands they start) compile with
LLVM at -O1 instead of -O3 (the same XLA graphs, several times faster to compile; results
agree to ~1e-7) into one compilation cache per session, shared by tests that compile the
same programs.
"""
import os
import tempfile

import numpy as np
import pytest

from cnnjax import runtime



def pytest_configure(config):
  del config
  flags = runtime.xla_flags(os.environ)
  if "--xla_backend_optimization_level" not in flags:
    flags += " --xla_backend_optimization_level=1"
  os.environ["XLA_FLAGS"] = flags.strip()
  os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="cnnjax-xla-"))
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
  runtime.configure()


def make_images(n: int, shape=(32, 32, 3), num_classes: int = 10, seed: int = 0):
  """Learnable synthetic images: each class brightens its own horizontal band."""
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, num_classes, n)
  images = rng.integers(0, 64, (n, *shape)).astype(np.int64)
  band = shape[0] // num_classes or 1
  for c in range(num_classes):
    images[labels == c, (c * band) % shape[0]:(c * band) % shape[0] + band] += 160
  return images.clip(0, 255).astype(np.uint8), labels.astype(np.int64)


@pytest.fixture
def npz_path(tmp_path):
  """A CIFAR-shaped .npz in the ../shared/data layout: 192 train and 64 test images."""
  x_train, y_train = make_images(192, seed=1)
  x_test, y_test = make_images(64, seed=2)
  lossless = np.arange(64) < 16
  path = tmp_path / "tiny_cifar.npz"
  np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test,
           test_is_lossless=lossless, class_names=np.array([f"c{i}" for i in range(10)]))
  return path


def tiny_config(npz_path, **kw):
  """A run config on ``npz_path``: seed_cnn, 128 training images in batches of 32 (4 steps
  per epoch), 2 epochs, crops and flips; ``kw`` overrides top-level keys."""
  from cnnjax import config as config_lib
  c = config_lib.default_config()
  c.data.source = str(npz_path)
  c.data.val_size = 64.0
  c.batch_size = 32
  c.eval_batch_size = 32
  c.num_epochs = 2
  c.data.augment.crop_padding = 2
  c.data.augment.horizontal_flip = True
  for k, v in kw.items():
    c[k] = v
  return c


@pytest.fixture
def compiles(monkeypatch) -> list:
  """One entry per XLA compile (``jax.stages.Lowered.compile``) from here on."""
  import jax
  seen = []
  real = jax.stages.Lowered.compile
  monkeypatch.setattr(jax.stages.Lowered, "compile",
                      lambda self, *a, **k: seen.append(1) or real(self, *a, **k))
  return seen


def stop_at_step(monkeypatch, n: int) -> None:
  """Runs built after this send themselves SIGTERM (as a preemption would) in their ``n``-th
  training step, so ``train_and_evaluate`` saves a checkpoint there and stops."""
  import signal
  from cnnjax import steps
  calls = {"n": 0}
  real_create = steps.Runner.create

  def create(*args, **kwargs):
    runner = real_create(*args, **kwargs)
    step = runner.train_step

    def counting_step(state, batch):
      calls["n"] += 1
      if calls["n"] == n:
        os.kill(os.getpid(), signal.SIGTERM)
      return step(state, batch)
    runner.train_step = counting_step
    return runner
  monkeypatch.setattr(steps.Runner, "create", create)


def event_records(directory) -> list:
  """The ``Event`` protos of the TensorBoard event files under ``directory``, decoded with
  tensorboardX's protobuf classes and CRCs (independent of ``cnnjax.tensorboard``), checking
  the TFRecord framing: length, its masked CRC-32C, the event, its masked CRC-32C."""
  import pathlib
  import struct
  from tensorboardX.record_writer import masked_crc32c
  from tensorboardX.proto import event_pb2
  events = []
  for path in sorted(pathlib.Path(directory).glob("events.out.tfevents.*")):
    data, at = path.read_bytes(), 0
    while at < len(data):
      header, (length,) = data[at:at + 8], struct.unpack("<Q", data[at:at + 8])
      body = data[at + 12:at + 12 + length]
      assert struct.unpack("<I", data[at + 8:at + 12])[0] == masked_crc32c(header)
      assert struct.unpack("<I", data[at + 12 + length:at + 16 + length])[0] == masked_crc32c(body)
      events.append(event_pb2.Event.FromString(body))
      at += 16 + length
    assert at == len(data)
  return events


def read_events(directory) -> dict[str, list[int]]:
  """Tag -> steps of the scalars and images in the TensorBoard event files under
  ``directory`` (``event_records``)."""
  tags: dict[str, list[int]] = {}
  for event in event_records(directory):
    for value in event.summary.value:
      tags.setdefault(value.tag, []).append(event.step)
  return tags
