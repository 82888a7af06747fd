"""The one run assembly: config -> data -> model -> initial variables -> optimizer -> compiled
steps (``build``), and the same for a finished run with its checkpoint restored (``restore``).

The commands, the Learner, the LR finder and the benchmarks all build their runs here. No LR
finder, no printing: ``train.train_and_evaluate`` does those.
"""
import dataclasses
import json
import pathlib
from collections.abc import Callable

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import optax

from cnnjax import config as config_lib
from cnnjax import initial, optim, parallel, steps, transfer
from cnnjax.checkpoint import Checkpoints
from cnnjax.data import augment as augment_lib
from cnnjax.data import pipeline, sources
from cnnjax.errors import UserError
from cnnjax.models import model_from_config

CHECKPOINTS = ("best", "latest")  # the ``which`` of ``restore``


@dataclasses.dataclass
class Run:
  """What a run builds from its config before the first step.

  Attributes:
    config: the run's config.
    data: the data the steps see: as loaded (a source without a test split is tested on
      its validation split), or the backbone's features after feature extraction.
    train, val: the training split after the validation split was taken off (or the
      source's own validation split).
    images: the data as images, for pictures (``data`` unless features were extracted).
    stats: ``(mean, std)`` ``[C]`` in pixel units of the normalisation.
    normalize: what the steps do to a batch of ``data`` first (resize, normalisation).
    model: the model the steps apply (a 'transfer' model's head after feature extraction).
    runner: the compiled steps on the device mesh.
    state: the initial train state (on the host): fresh, pretrained or another run's.
    schedule: the learning rate per step.
    steps_per_epoch: training batches per epoch (the remainder is dropped).
    augment: the training batches' augmentation (None: off).
    notes: one line per source of initial weights (``initial.initial_state``).
  """
  config: ml_collections.ConfigDict
  data: sources.Dataset
  train: pipeline.Arrays
  val: pipeline.Arrays
  images: sources.Dataset
  stats: tuple[np.ndarray, np.ndarray]
  normalize: Callable[[jax.Array], jax.Array]
  model: nn.Module
  runner: steps.Runner
  state: steps.TrainState
  schedule: optax.Schedule
  steps_per_epoch: int
  augment: pipeline.BatchAugment | None
  notes: list[str]

  @property
  def total_steps(self) -> int:
    """Optimizer steps in the whole run."""
    return self.steps_per_epoch * self.config.num_epochs

  def with_peak_lr(self, lr: float) -> "Run":
    """The run with its schedule peaking at ``lr`` and a fresh optimizer state."""
    cfg = self.config
    schedule = optim.make_schedule(cfg.schedule, lr, self.total_steps)
    tx = optim.make_optimizer(cfg.optimizer, schedule)
    state = self.state.replace(tx=tx, opt_state=steps.init_opt_state(tx, self.state.params))
    return dataclasses.replace(self, schedule=schedule, state=state)


  def with_stats(self, mean: np.ndarray, std: np.ndarray) -> "Run":
    """The run normalising by ``(mean, std)`` ``[C]`` (pixel units) instead, steps recompiled."""
    c = self.config
    normalize = steps.make_normalize(mean, std, c.data.input_size)
    frozen = optim.frozen_modules(self.state.params, c.optimizer.groups)
    runner = steps.Runner.for_config(c, normalize, self.runner.mesh, frozen, self.total_steps)
    return dataclasses.replace(self, stats=(mean, std), normalize=normalize, runner=runner)


def check_labels(data: sources.Dataset, num_classes: int, loss: str) -> None:
  """A training split, labels of every split in ``[0, num_classes)`` (0/1 with one sigmoid
  output), and as many classes as the model has outputs."""
  if not len(data.train[1]):
    raise UserError("the training split is empty; expected at least one batch of examples")
  if loss == "cross_entropy" and num_classes == 1:
    raise UserError("config.model.num_classes=1 with config.loss='cross_entropy' learns nothing "
                    "(the softmax of one output is 1); expected num_classes >= 2, or "
                    "loss='binary_cross_entropy' for one sigmoid output")
  splits = [data.train, data.test] + ([data.val] if data.val is not None else [])
  labels = [lab for _, lab in splits if len(lab)]
  low, high = min(int(lab.min()) for lab in labels), max(int(lab.max()) for lab in labels)
  if loss == "binary_cross_entropy":
    if num_classes != 1 or high > 1 or low < 0:
      raise UserError(f"config.loss='binary_cross_entropy' has config.model.num_classes="
                      f"{num_classes} and labels {low}..{high}; expected num_classes=1 "
                      "(one sigmoid output) and labels 0/1")
  elif low < 0 or high >= num_classes:
    bad = low if low < 0 else high
    raise UserError(f"data has label {bad} but config.model.num_classes={num_classes}; "
                    f"expected labels in [0, {num_classes})")
  classes = len(data.class_names)
  if classes != (2 if loss == "binary_cross_entropy" else num_classes):
    raise UserError(f"data has {classes} classes ({', '.join(data.class_names[:5])}"
                    f"{', ...' if classes > 5 else ''}) but config.model.num_classes={num_classes}"
                    f"; expected num_classes={1 if loss == 'binary_cross_entropy' else classes}")


def load_data(config: ml_collections.ConfigDict) -> sources.Dataset:
  """``config.data.source`` loaded (first ``data.limit`` examples if > 0)."""
  return sources.load(config.data.source, config.data.tfds_data_dir, config.data.image_size,
                      config.data.limit)


def build(config: ml_collections.ConfigDict, workdir: str | pathlib.Path | None = None,
          data: sources.Dataset | None = None, model: nn.Module | None = None) -> Run:
  """Loads and splits the data, builds the model, initial state, optimizer and steps.

  Args:
    config: a run config (``cnnjax.config.default_config`` and its studies).
    workdir: where ``config.extract_features`` caches the backbone's features
      (``features.npz``); None: no cache.
    data: the data instead of ``config.data.source`` (the Learner's arrays).
    model: a module instead of ``config.model`` (a Learner's own ``flax.linen`` module).
  """
  config_lib.check(config)
  data = load_data(config) if data is None else data
  check_labels(data, config.model.num_classes, config.loss)
  if data.val is None:
    train_data, val_data = pipeline.split_validation(*data.train, config.data.val_size, config.seed)
  else:
    train_data, val_data = data.train, data.val
  if not len(data.test[1]):
    data = dataclasses.replace(data, test=val_data)
  images = data
  size = config.data.input_size  # > 0: the steps resize each batch to size x size
  stats = pipeline.normalization_stats(config.data.normalization, train_data[0])
  normalize = steps.make_normalize(*stats, size)
  image_shape = (size, size, data.image_shape[-1]) if size else data.image_shape
  if config.eval_shift < 0 or config.eval_shift >= min(image_shape[:2]):
    raise UserError(f"config.eval_shift={config.eval_shift}; expected 0 <= eval_shift < the "
                    f"image side {min(image_shape[:2])}")
  model = model_from_config(config.model) if model is None else model
  augment = augment_lib.from_config(config.data.augment.to_dict())
  if config.extract_features:
    if (augment is not None or config.eval_rotation or config.eval_flip or config.eval_shift
        or config.optimizer.groups or config.init_from):
      raise UserError("config.extract_features runs the backbone once and trains the head "
                      "alone; expected data.augment off, eval_rotation=0, eval_flip=False, "
                      "eval_shift=0, optimizer.groups=() and no init_from")
    cache = pathlib.Path(workdir) / "features.npz" if workdir is not None else None
    fingerprint = json.dumps([config.model.to_dict(), config.data.to_dict(), config.seed],
                             sort_keys=True)
    model, (train_data, val_data, test) = transfer.feature_extraction(
        model, config.model.pretrained, normalize, [train_data, val_data, data.test],
        image_shape=image_shape, seed=config.seed, batch_size=config.eval_batch_size,
        cache=cache, fingerprint=fingerprint)
    data = dataclasses.replace(data, train=train_data, val=val_data, test=test)
    normalize, image_shape = steps.make_normalize(0.0, 1.0), data.image_shape
    config = config.copy_and_resolve_references()
    with config.unlocked():
      config.model.pretrained = None  # the backbone's weights are in the features
  if config.batch_size > len(train_data[1]):
    raise UserError(f"batch_size={config.batch_size} is larger than the {len(train_data[1])} "
                    "training examples; expected a smaller batch_size or more data")
  mesh = parallel.make_mesh()
  parallel.check_batch_size(config.batch_size, mesh)
  steps_per_epoch = len(train_data[0]) // config.batch_size
  total_steps = steps_per_epoch * config.num_epochs
  schedule = optim.make_schedule(config.schedule, config.optimizer.lr, total_steps)
  tx = optim.make_optimizer(config.optimizer, schedule)
  state = steps.create_train_state(model, tx, image_shape, config.seed, config.init)
  state, notes = initial.initial_state(config, model, state, train_data[0], normalize, image_shape)
  if config.ema:
    state = steps.with_ema(state)
  frozen = optim.frozen_modules(state.params, config.optimizer.groups)
  runner = steps.Runner.for_config(config, normalize, mesh, frozen, total_steps)
  return Run(config, data, train_data, val_data, images, stats, normalize, model, runner, state,
             schedule, steps_per_epoch, augment, notes)


def read_config(workdir: str | pathlib.Path) -> ml_collections.ConfigDict:
  """The config a run in ``workdir`` was written with (``config.json``; keys added to the
  schema since take their defaults)."""
  path = pathlib.Path(workdir) / "config.json"
  if not path.exists():
    raise UserError(f"{workdir} is not a run directory: no config.json; expected the --workdir "
                    "of a finished experiment")
  try:
    saved = json.loads(path.read_text())
  except ValueError as e:
    raise UserError(f"{path} is not a saved config ({e}); expected the --workdir of a cnnjax "
                    "run") from e
  return config_lib.merged(saved)


def restore(workdir: str | pathlib.Path, which: str = "best") -> Run:
  """The run in ``workdir`` rebuilt, its state restored from the ``'best'`` (lowest
  validation loss) or ``'latest'`` checkpoint, on the mesh; if that one cannot be read, from
  the newest that can (said in ``run.notes``)."""
  if which not in CHECKPOINTS:
    raise UserError(f"checkpoint {which!r}; expected one of {list(CHECKPOINTS)}")
  run = build(read_config(workdir), workdir)
  checkpoints = Checkpoints(pathlib.Path(workdir) / "checkpoints")
  step = checkpoints.best_step() if which == "best" else checkpoints.latest_step()
  if step is None:
    raise UserError(f"{workdir}/checkpoints holds no checkpoint to restore")
  _, run.state, skipped = checkpoints.restore_intact(run.state, parallel.replicated(run.runner.mesh),
                                                     prefer=step)
  run.notes += skipped
  checkpoints.close()
  return run
