"""The one training loop: train state, compiled steps, epochs, evaluation, checkpoints.

``train_and_evaluate(config, workdir)`` runs a whole experiment; the experiments, the
notebook API and the LR finder all build on the pieces below.

A workdir holds: ``config.json``, ``run_info.json`` (machine, versions, devices),
``metrics.jsonl`` and ``metrics.csv`` (one row per epoch), ``curves.png``,
``test_metrics.json``, ``confusion.png``, ``predictions.png`` and ``checkpoints/`` (latest
and best).
"""
import dataclasses
import json
import pathlib
import signal
import sys
import time
from typing import Any, Callable

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import traverse_util
from flax.training import train_state

from cnnjax import config as config_lib
from cnnjax import logs
from cnnjax import metrics as metrics_lib
from cnnjax import optim, parallel, plots, transfer
from cnnjax.checkpoint import Checkpoints
from cnnjax.data import augment as augment_lib
from cnnjax.data import pipeline, sources
from cnnjax.errors import UserError
from cnnjax.models import TransferNet, create_model

Batch = dict[str, jax.Array]


class TrainState(train_state.TrainState):
  """params, opt_state and step (from flax), plus batch-norm statistics and the rng
  from which each step's dropout key is folded (raw uint32 key, so orbax can save it)."""
  batch_stats: Any
  rng: jax.Array


def create_train_state(model: nn.Module, tx: optax.GradientTransformation,
                       image_shape: tuple[int, ...], seed: int) -> TrainState:
  """Initialises ``model`` for images ``[H, W, C]`` and wraps it with optimizer ``tx``."""
  init_rng, rng = jax.random.split(jax.random.PRNGKey(seed))
  dummy = jnp.zeros((1, *image_shape), jnp.float32)
  try:
    variables = jax.jit(lambda r: model.init(r, dummy, train=False))(init_rng)
  except (TypeError, ValueError, ZeroDivisionError) as e:  # shape errors: input does not fit
    first = str(e).strip().splitlines()[0][:200]
    raise UserError(f"images of shape {tuple(image_shape)} do not fit model "
                    f"{type(model).__name__} ({first})") from e
  params = variables["params"]
  return TrainState.create(apply_fn=model.apply, params=params, tx=tx,
                           batch_stats=variables.get("batch_stats", {}), rng=rng)


def cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0) -> jax.Array:
  """Per-example softmax cross-entropy. logits ``[B, K]``, integer labels ``[B]`` -> ``[B]``."""
  targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), label_smoothing)
  return optax.softmax_cross_entropy(logits, targets)


LOSSES = ("cross_entropy", "binary_cross_entropy")


def loss_and_prediction(logits: jax.Array, labels: jax.Array, loss: str = "cross_entropy",
                        label_smoothing: float = 0.0) -> tuple[jax.Array, jax.Array]:
  """Per-example loss ``[B]`` and predicted class ``[B]`` for integer ``labels`` ``[B]``.

  'cross_entropy': softmax over logits ``[B, K]``, the argmax predicted. 'binary_cross_entropy':
  one sigmoid logit ``[B, 1]`` per example for labels 0/1, class 1 predicted when its
  probability is > 0.5 (targets smoothed towards 1/2 by ``label_smoothing``).
  """
  if loss == "binary_cross_entropy":
    targets = labels * (1.0 - label_smoothing) + 0.5 * label_smoothing
    return (optax.sigmoid_binary_cross_entropy(logits[:, 0], targets),
            (logits[:, 0] > 0).astype(labels.dtype))
  return cross_entropy(logits, labels, label_smoothing), logits.argmax(-1)


def make_normalize(mean: np.ndarray, std: np.ndarray,
                   size: int = 0) -> Callable[[jax.Array], jax.Array]:
  """uint8 images ``[B, H, W, C]`` -> float32 ``(x - mean) / std`` (stats in pixel units
  ``[C]``), resized to ``[B, size, size, C]`` first if ``size`` > 0 (bilinear, antialiased
  when shrinking, as ``augment.resize``; e.g. CIFAR's 32x32 up to a backbone's 224x224)."""
  mean, std = jnp.asarray(mean, jnp.float32), jnp.asarray(std, jnp.float32)

  def normalize(images: jax.Array) -> jax.Array:
    x = images.astype(jnp.float32)
    if size:
      x = jax.image.resize(x, (x.shape[0], size, size, x.shape[3]), "linear")
    return (x - mean) / std
  return normalize


def _variables(state: TrainState, params: Any) -> dict[str, Any]:
  return {"params": params, "batch_stats": state.batch_stats} if state.batch_stats else {"params": params}


def make_train_step(normalize: Callable[[jax.Array], jax.Array], label_smoothing: float = 0.0,
                    loss: str = "cross_entropy",
                    frozen: frozenset[tuple[str, ...]] = frozenset()):
  """``train_step(state, batch) -> (state, sums)``: one optimizer step on a batch.

  ``sums`` holds ``loss`` (summed over the batch), ``correct`` and ``count``, so epochs
  accumulate exact means. Dropout uses ``fold_in(state.rng, state.step)``; batch norm
  runs in train mode and its new statistics replace the old, except in the ``frozen``
  modules (``optim.frozen_modules``), which run in inference mode and keep theirs
  (``transfer.frozen_inference``). ``loss``: one of LOSSES.
  """
  def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
    images, labels = normalize(batch["image"]), batch["label"]
    chex.assert_rank(images, 4)
    dropout_rng = jax.random.fold_in(state.rng, state.step)

    def loss_fn(params):
      with transfer.frozen_inference(frozen):
        logits, updates = state.apply_fn(_variables(state, params), images, train=True,
                                         rngs={"dropout": dropout_rng}, mutable=["batch_stats"])
      losses, pred = loss_and_prediction(logits, labels, loss, label_smoothing)
      return losses.mean(), (losses, pred, updates)

    grads, (losses, pred, updates) = jax.grad(loss_fn, has_aux=True)(state.params)
    state = state.apply_gradients(grads=grads,
                                  batch_stats=updates.get("batch_stats", state.batch_stats))
    sums = {"loss": losses.sum(), "correct": (pred == labels).sum(),
            "count": jnp.asarray(labels.shape[0])}
    return state, sums
  return train_step


def test_time_logits(logits_of: Callable[[jax.Array], jax.Array], images: jax.Array,
                     flip: bool = False, shift: int = 0) -> jax.Array:
  """Logits ``[B, K]`` of ``images`` ``[B, H, W, C]`` averaged over test-time views.

  ``logits_of`` maps images to logits. ``flip``: each view's logits are the mean over it
  and its horizontal mirror. ``shift > 0``: the image's logits weigh 1/2 and those of the
  image translated by ``(shift, shift)`` and by ``(-shift, -shift)`` pixels (edges
  reflected) 1/4 each (airbench's translated test-time views).
  """
  def view(x: jax.Array) -> jax.Array:
    return (logits_of(x) + logits_of(x[:, :, ::-1])) / 2 if flip else logits_of(x)
  logits = view(images)
  if shift:
    _, h, w, _ = images.shape
    padded = jnp.pad(images, ((0, 0), (shift, shift), (shift, shift), (0, 0)), mode="reflect")
    s2 = 2 * shift
    logits = (logits / 2 + view(padded[:, :h, :w]) / 4
              + view(padded[:, s2:s2 + h, s2:s2 + w]) / 4)
  return logits


def make_eval_step(normalize: Callable[[jax.Array], jax.Array], loss: str = "cross_entropy",
                   flip: bool = False, shift: int = 0):
  """``eval_step(state, batch) -> out``: batch norm in inference mode, padding masked.

  ``out`` holds ``loss``/``correct``/``count`` sums over real examples, ``pred`` ``[B]``
  (predicted class, see ``loss_and_prediction``) and ``mask`` ``[B]`` (False on padding rows).
  ``flip``, ``shift``: test-time augmentation, see ``test_time_logits``.
  """
  def eval_step(state: TrainState, batch: Batch) -> dict[str, jax.Array]:
    def logits_of(images: jax.Array) -> jax.Array:
      return state.apply_fn(_variables(state, state.params), normalize(images), train=False)
    logits = test_time_logits(logits_of, batch["image"], flip, shift)
    mask = batch["mask"]
    losses, pred = loss_and_prediction(logits, batch["label"], loss)
    return {"loss": jnp.where(mask, losses, 0.0).sum(),
            "correct": ((pred == batch["label"]) & mask).sum(),
            "count": mask.sum(), "pred": pred, "mask": mask}
  return eval_step


@dataclasses.dataclass
class Runner:
  """The compiled steps of one run on one mesh, and the loops that drive them."""
  train_step: Callable[..., Any]
  eval_step: Callable[..., Any]
  mesh: jax.sharding.Mesh

  @classmethod
  def create(cls, normalize: Callable[[jax.Array], jax.Array], label_smoothing: float = 0.0,
             mesh: jax.sharding.Mesh | None = None, loss: str = "cross_entropy",
             frozen: frozenset[tuple[str, ...]] = frozenset(),
             eval_flip: bool = False, eval_shift: int = 0) -> "Runner":
    """Compiles the steps of ``make_train_step``/``make_eval_step`` (``flip=eval_flip``,
    ``shift=eval_shift``) for ``mesh``."""
    if loss not in LOSSES:
      raise UserError(f"unknown loss {loss!r}; expected one of {list(LOSSES)}")
    mesh = mesh or parallel.make_mesh()
    rep, data = parallel.replicated(mesh), parallel.data_sharding(mesh)
    train_step = jax.jit(make_train_step(normalize, label_smoothing, loss, frozen),
                         in_shardings=(rep, data), out_shardings=(rep, rep), donate_argnums=0)
    eval_step = jax.jit(make_eval_step(normalize, loss, eval_flip, eval_shift),
                        in_shardings=(rep, data), out_shardings=rep)
    return cls(train_step, eval_step, mesh)

  def put_state(self, state: TrainState) -> TrainState:
    return jax.device_put(state, parallel.replicated(self.mesh))

  def to_global(self, batch: dict[str, np.ndarray]) -> Batch:
    return parallel.to_global(batch, parallel.data_sharding(self.mesh))

  def evaluate(self, state: TrainState, data: pipeline.Arrays, batch_size: int) -> dict[str, Any]:
    """Loss, accuracy and predictions ``[N]`` over every example of ``data`` once.

    Every process holds the whole ``data`` and reads its slice of each batch; the
    predictions come back replicated, so each process gets all ``N`` of them.
    """
    parallel.check_batch_size(batch_size, self.mesh, "eval_batch_size")
    totals = {"loss": 0.0, "correct": 0, "count": 0}
    preds = []
    for batch in pipeline.eval_batches(data, batch_size, parallel.process_shard()):
      out = jax.device_get(self.eval_step(state, self.to_global(batch)))
      for k in totals:
        totals[k] += out[k]
      preds.append(out["pred"][out["mask"]])
    count = int(totals["count"])
    return {"loss": float(totals["loss"]) / count, "accuracy": int(totals["correct"]) / count,
            "pred": np.concatenate(preds)}


class StopRequested:
  """Turns SIGTERM (preemption) and Ctrl-C into a flag the loop checks between steps,
  so the run saves a checkpoint and exits cleanly instead of dying mid-write."""

  def __init__(self):
    self.requested = False
    self._previous = {}

  def __enter__(self) -> "StopRequested":
    for sig in (signal.SIGTERM, signal.SIGINT):
      self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    del frame
    if self.requested:  # a second Ctrl-C: stop now
      raise KeyboardInterrupt
    self.requested = True
    print(f"\n{signal.Signals(signum).name}: saving a checkpoint, then stopping "
          "(run again with the same --workdir to resume)", flush=True)

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)

  def agreed(self) -> bool:
    """Whether any process was asked to stop, the same answer on all (a collective with
    several processes: SIGTERM reaches each at a different step, and a process that
    stopped alone would leave the others waiting in the next step's all-reduce)."""
    self.requested = parallel.any_process(self.requested)
    return self.requested


def _progress(total: int, initial: int, desc: str):
  """A tqdm bar inside the epoch in a terminal or a Jupyter notebook; else (logs) nothing."""
  if not (sys.stdout.isatty() or "ipykernel" in sys.modules) or jax.process_index() != 0:
    return None
  from tqdm.auto import tqdm
  return tqdm(total=total, initial=initial, desc=desc, leave=False, dynamic_ncols=True)


def make_augment(cfg: ml_collections.ConfigDict) -> pipeline.BatchAugment | None:
  """The configured Keras-style batch augmentation, or None when every option is off."""
  augment = augment_lib.KerasAugment.from_config(cfg.to_dict())
  return None if augment == augment_lib.KerasAugment() else augment


def model_from_config(cfg: ml_collections.ConfigDict) -> nn.Module:
  """The model of a ``model`` config: its keys but those that choose initial weights
  (``pretrained``, ``head_classes``) go to ``create_model``."""
  return create_model(**{k: v for k, v in cfg.to_dict().items()
                         if k not in ("pretrained", "head_classes")})


def _check_workdir_config(workdir: pathlib.Path, config: ml_collections.ConfigDict) -> None:
  """A workdir with checkpoints of a different model or data shape cannot be resumed.

  The saved config is read through ``config.merged``, so keys added to the schema since the
  run was written take their defaults instead of counting as differences."""
  path = workdir / "config.json"
  if not path.exists():
    return
  saved = config_lib.merged(json.loads(path.read_text()))
  for key in ("model", "data"):
    was = traverse_util.flatten_dict(saved[key].to_dict(), sep=".")
    now = traverse_util.flatten_dict(config[key].to_dict(), sep=".")
    changed = [f"{key}.{k}: {was.get(k)!r} -> {now.get(k)!r}"
               for k in sorted(was.keys() | now.keys()) if was.get(k) != now.get(k)]
    if changed:
      raise UserError(f"workdir {workdir} holds a run with a different config "
                      f"({'; '.join(changed)}); use a new --workdir or the same config")


@dataclasses.dataclass
class Setup:
  """What a run builds from its config before the first step.

  Attributes:
    data: the data the steps see: as loaded (a source without a test split is tested on
      its validation split), or the backbone's features after feature extraction.
    train, val: the training split after the validation split was taken off (or the
      source's own validation split).
    runner: the compiled steps on the device mesh.
    state: the initial train state (on the host): fresh, pretrained or another run's.
    schedule: the learning rate per step.
    steps_per_epoch: training batches per epoch (the remainder is dropped).
    images: the data as images, for pictures (``data`` unless features were extracted).
    normalize: what the steps do to a batch of ``data`` first (resize, normalisation).
  """
  data: sources.Dataset
  train: pipeline.Arrays
  val: pipeline.Arrays
  runner: Runner
  state: TrainState
  schedule: optax.Schedule
  steps_per_epoch: int
  images: sources.Dataset
  normalize: Callable[[jax.Array], jax.Array]


def _check_labels(data: sources.Dataset, num_classes: int, loss: str) -> None:
  splits = [data.train, data.test] + ([data.val] if data.val is not None else [])
  labels_max = max(int(labels.max()) for _, labels in splits if len(labels))
  if loss == "binary_cross_entropy":
    if num_classes != 1 or labels_max > 1:
      raise UserError(f"config.loss='binary_cross_entropy' has config.model.num_classes="
                      f"{num_classes} and labels up to {labels_max}; expected num_classes=1 "
                      "(one sigmoid output) and labels 0/1")
  elif labels_max >= num_classes:
    raise UserError(f"data has label {labels_max} but config.model.num_classes={num_classes}; "
                    f"expected labels in [0, {num_classes})")


def setup(config: ml_collections.ConfigDict, workdir: str | pathlib.Path | None = None) -> Setup:
  """Loads and splits the data, builds the model, optimizer, steps and initial state.

  Transfer learning (``cnnjax.transfer``): ``config.model.pretrained`` loads weights into
  the initial state, ``config.init_from`` another run's latest instead; the rules in
  ``config.optimizer.groups`` freeze parameters and put the modules they freeze whole in
  inference mode. With ``config.extract_features`` the backbone of a 'transfer' model
  runs once over the data (cached in ``workdir/features.npz`` if a ``workdir`` is given)
  and only its head is trained, on the features. A fresh model with a ``data_init(train_images,
  normalize)`` method (AirbenchNet's whitening) gets the variables it returns.
  """
  data = sources.load(config.data.source, config.data.tfds_data_dir, config.data.image_size)
  if config.data.limit:
    data = data.head(config.data.limit)
  _check_labels(data, config.model.num_classes, config.loss)
  if data.val is None:
    train_data, val_data = pipeline.split_validation(*data.train, config.data.val_size, config.seed)
  else:
    train_data, val_data = data.train, data.val
  if not len(data.test[1]):
    data = dataclasses.replace(data, test=val_data)
  images = data
  size = config.data.input_size  # > 0: the steps resize each batch to size x size
  stats = pipeline.normalization_stats(config.data.normalization, train_data[0])
  normalize = make_normalize(*stats, size)
  image_shape = (size, size, data.image_shape[-1]) if size else data.image_shape
  if config.eval_shift < 0 or config.eval_shift >= min(image_shape[:2]):
    raise UserError(f"config.eval_shift={config.eval_shift}; expected 0 <= eval_shift < the "
                    f"image side {min(image_shape[:2])}")
  pretrained, head_classes = config.model.pretrained, config.model.head_classes
  model = model_from_config(config.model)
  if config.extract_features:
    if (make_augment(config.data.augment) is not None or config.eval_rotation
        or config.eval_flip or config.eval_shift or config.optimizer.groups
        or config.init_from):
      raise UserError("config.extract_features runs the backbone once and trains the head "
                      "alone; expected data.augment off, eval_rotation=0, eval_flip=False, "
                      "eval_shift=0, optimizer.groups=() and no init_from")
    cache = pathlib.Path(workdir) / "features.npz" if workdir is not None else None
    fingerprint = json.dumps([config.model.to_dict(), config.data.to_dict(), config.seed],
                             sort_keys=True)
    model, (train_data, val_data, test) = transfer.feature_extraction(
        model, pretrained, normalize, [train_data, val_data, data.test], image_shape=image_shape,
        seed=config.seed, batch_size=config.eval_batch_size, cache=cache, fingerprint=fingerprint)
    data = dataclasses.replace(data, train=train_data, val=val_data, test=test)
    normalize, pretrained, image_shape = make_normalize(0.0, 1.0), None, data.image_shape
  mesh = parallel.make_mesh()
  parallel.check_batch_size(config.batch_size, mesh)
  steps_per_epoch = len(train_data[0]) // config.batch_size
  schedule = optim.make_schedule(config.schedule, config.optimizer.lr,
                                 steps_per_epoch * config.num_epochs)
  tx = optim.make_optimizer(config.optimizer, schedule)
  state = create_train_state(model, tx, image_shape, config.seed)
  if hasattr(model, "data_init") and not (config.init_from or pretrained):
    state = transfer.with_variables(state, model.data_init(train_data[0], normalize),
                                    f"{type(model).__name__}.data_init")
  if config.init_from:
    state = transfer.init_from_run(state, config.init_from)
  elif pretrained:
    variables = transfer.pretrained_variables(model, config.model.name, pretrained, image_shape,
                                              config.seed)
    state = transfer.with_variables(state, variables, f"weights {pretrained!r}")
  if head_classes and not config.init_from:
    if not (pretrained and isinstance(model, TransferNet)):
      raise UserError(f"config.model.head_classes={tuple(head_classes)} needs a 'transfer' "
                      "model with pretrained weights and no extract_features")
    state = transfer.with_variables(
        state, transfer.classifier_head(model, pretrained, head_classes, image_shape),
        f"the classifier rows {tuple(head_classes)} of {pretrained!r}")
  frozen = optim.frozen_modules(state.params, config.optimizer.groups)
  runner = Runner.create(normalize, config.label_smoothing, mesh, config.loss, frozen,
                         config.eval_flip, config.eval_shift)
  s = Setup(data, train_data, val_data, runner, state, schedule, steps_per_epoch, images, normalize)
  if config.schedule.peak_lr is not None:
    _use_lr_finder(config, s)
  return s


def _use_lr_finder(config: ml_collections.ConfigDict, s: Setup) -> None:
  """Replaces the schedule's peak rate in ``s`` by the LR finder's suggestion
  (``config.schedule.peak_lr='auto'``), found from ``s.state`` (left untouched)."""
  if config.schedule.peak_lr != "auto":
    raise UserError(f"config.schedule.peak_lr={config.schedule.peak_lr!r}; expected 'auto' "
                    "(a fixed rate is config.optimizer.lr)")
  from cnnjax import lr_finder  # it builds on this module
  lr = lr_finder.suggest_lr(config, s)
  if jax.process_index() == 0:
    print(f"LR finder: peak learning rate {lr:.3g}", flush=True)
  s.schedule = optim.make_schedule(config.schedule, lr, s.steps_per_epoch * config.num_epochs)
  tx = optim.make_optimizer(config.optimizer, s.schedule)
  s.state = s.state.replace(tx=tx, opt_state=tx.init(s.state.params))


def fit(runner: Runner, state: TrainState, train_data: pipeline.Arrays, val_data: pipeline.Arrays, *,
        num_epochs: int, batch_size: int, eval_batch_size: int, seed: int,
        augment: pipeline.BatchAugment | None, schedule: optax.Schedule,
        on_epoch_end: Callable[[TrainState, dict[str, Any]], None] = lambda state, row: None,
        stop: "StopRequested | None" = None, log_every_steps: int = 10,
        workers: int = 0) -> TrainState:
  """The epoch loop, from ``state.step`` (mid-epoch after a resume) to ``num_epochs``.

  Each epoch trains on ``pipeline.train_epoch(train_data, ..., seed, epoch)``, evaluates
  on ``val_data`` (if any) and calls ``on_epoch_end(state, row)`` with the epoch's
  metrics row (``epoch, step, train_loss, train_accuracy, val_loss, val_accuracy, lr,
  seconds``). Returns the final state, or the state at the step where ``stop`` was
  requested (check ``stop.requested``). ``workers`` > 0 prepares batches in that many
  grain worker processes (``pipeline.prefetch``) instead of a background thread.
  """
  steps_per_epoch = len(train_data[0]) // batch_size
  shard = parallel.process_shard()
  for epoch in range(int(state.step) // steps_per_epoch, num_epochs):
    first = int(state.step) - epoch * steps_per_epoch
    batches = pipeline.train_epoch(train_data, batch_size, seed, epoch, augment, shard)
    bar = _progress(steps_per_epoch, first, f"Epoch {epoch + 1}/{num_epochs}")
    sums = {"loss": 0.0, "correct": 0, "count": 0}
    start = time.time()
    stopped = False
    for k, batch in enumerate(pipeline.prefetch(batches[first:], workers=workers), start=first):
      state, step_sums = runner.train_step(state, runner.to_global(batch))
      sums = jax.tree.map(jnp.add, sums, step_sums)
      if bar is not None and (k + 1) % log_every_steps == 0:
        bar.set_postfix(loss=f"{float(sums['loss']) / int(sums['count']):.4f}")
        bar.update(log_every_steps)
      stopped = stop is not None and stop.agreed()
      if stopped:
        break
    if bar is not None:
      bar.close()
    if stopped:
      return state
    sums = jax.device_get(sums)
    row = {"epoch": epoch + 1, "step": int(state.step),
           "train_loss": float(sums["loss"]) / int(sums["count"]),
           "train_accuracy": int(sums["correct"]) / int(sums["count"]),
           "lr": float(schedule(int(state.step) - 1))}
    if len(val_data[1]):
      val = runner.evaluate(state, val_data, eval_batch_size)
      row.update(val_loss=val["loss"], val_accuracy=val["accuracy"])
    row["seconds"] = time.time() - start
    on_epoch_end(state, row)
  return state


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> dict[str, Any]:
  """Trains ``config.model`` on ``config.data``, checkpointing to ``workdir`` every epoch.

  Rerunning with the same workdir resumes from the latest checkpoint with the exact next
  batch. Returns the final test metrics (also written to ``workdir/test_metrics.json``),
  or ``{'interrupted': True, 'step': ...}`` if a signal stopped the run.
  """
  workdir = pathlib.Path(workdir)
  is_main = jax.process_index() == 0
  ckpt_dir = workdir / "checkpoints"
  if ckpt_dir.exists() and any(ckpt_dir.iterdir()):
    _check_workdir_config(workdir, config)
  if is_main:
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.json.tmp").write_text(config.to_json(indent=2))
    (workdir / "config.json.tmp").replace(workdir / "config.json")  # others may be reading it
    (workdir / "run_info.json").write_text(json.dumps(logs.run_info(), indent=2))

  s = setup(config, workdir)
  checkpoints = Checkpoints(ckpt_dir)
  state = s.state
  start_step = checkpoints.latest_step() or 0
  if start_step:
    state = checkpoints.restore(start_step, state, parallel.replicated(s.runner.mesh))
    print(f"Resumed from {ckpt_dir}/{start_step} (epoch {start_step // s.steps_per_epoch + 1}, "
          f"batch {start_step % s.steps_per_epoch})", flush=True)
  history = logs.read_history(workdir, start_step // s.steps_per_epoch)

  def on_epoch_end(state: TrainState, row: dict[str, Any]) -> None:
    history.append(row)
    checkpoints.save(row["step"], state, {"val_loss": row.get("val_loss", row["train_loss"])})
    if is_main:
      print(format_epoch(row, config.num_epochs), flush=True)
      logs.write_history(history, workdir)
      plots.plot_curves(history, workdir / "curves.png")

  with StopRequested() as stop:
    state = fit(s.runner, s.runner.put_state(state), s.train, s.val, num_epochs=config.num_epochs,
                batch_size=config.batch_size, eval_batch_size=config.eval_batch_size,
                seed=config.seed, augment=make_augment(config.data.augment), schedule=s.schedule,
                on_epoch_end=on_epoch_end, stop=stop, log_every_steps=config.log_every_steps,
                workers=config.data.workers)
  if stop.agreed():
    checkpoints.save(int(state.step), state)
    checkpoints.wait()
    checkpoints.close()
    return {"interrupted": True, "step": int(state.step)}

  checkpoints.wait()
  if config.test_with == "best" and checkpoints.best_step() != int(state.step):
    state = s.runner.put_state(checkpoints.restore(checkpoints.best_step(), state))
  checkpoints.close()
  result, pred = test_report(s.runner, state, s.data, config.eval_batch_size, config.eval_rotation,
                             config.seed)
  if is_main:
    (workdir / "test_metrics.json").write_text(json.dumps(result, indent=2))
    write_test_pictures(workdir, s.images, result, pred)
    print(format_test(result), flush=True)
  return result


def restore_run(workdir: str | pathlib.Path, which: str = "best") -> tuple[ml_collections.ConfigDict, Setup]:
  """The config and setup of a finished (or interrupted) run, with ``setup.state`` restored
  from its ``'best'`` (lowest validation loss) or ``'latest'`` checkpoint, on the mesh."""
  if which not in ("best", "latest"):
    raise UserError(f"checkpoint {which!r}; expected one of ['best', 'latest']")
  workdir = pathlib.Path(workdir)
  path = workdir / "config.json"
  if not path.exists():
    raise UserError(f"{workdir} is not a run directory: no config.json; expected the --workdir "
                    "of a finished experiment")
  config = config_lib.merged(json.loads(path.read_text()))
  s = setup(config, workdir)
  checkpoints = Checkpoints(workdir / "checkpoints")
  step = checkpoints.best_step() if which == "best" else checkpoints.latest_step()
  if step is None:
    raise UserError(f"{workdir}/checkpoints holds no checkpoint to restore")
  s.state = checkpoints.restore(step, s.state, parallel.replicated(s.runner.mesh))
  checkpoints.close()
  return config, s


def test_report(runner: Runner, state: TrainState, data: sources.Dataset, batch_size: int,
                rotation: float = 0.0, seed: int = 0) -> tuple[dict[str, Any], np.ndarray]:
  """Test metrics and predictions ``[N]``.

  The metrics: loss, accuracy, per-class and macro precision/recall/F1, the confusion
  matrix, the accuracy on each named test subset (e.g. CIFAR-10's 1,000 lossless
  images) and, if ``rotation`` > 0, the accuracy on the test set rotated by seeded random
  angles in ``[-rotation, rotation]`` degrees with fill 0 (robustness).
  """
  out = runner.evaluate(state, data.test, batch_size)
  images, labels = data.test
  cm = metrics_lib.confusion_matrix(labels, out["pred"], len(data.class_names))
  result = {"test_loss": out["loss"], **metrics_lib.classification_report(cm, data.class_names)}
  for name, mask in data.test_subsets.items():
    result[f"accuracy_{name}"] = float((out["pred"][mask] == labels[mask]).mean())
    result[f"count_{name}"] = int(mask.sum())
  if rotation:
    rotated = augment_lib.random_rotation(images, np.random.default_rng(seed), rotation, fill_value=0)
    result["accuracy_rotated"] = runner.evaluate(state, (rotated, labels), batch_size)["accuracy"]
    result["count_rotated"] = len(labels)
    result["rotation_degrees"] = rotation
  result["count"] = len(labels)
  return result, out["pred"]


def write_test_pictures(workdir: pathlib.Path, data: sources.Dataset, result: dict[str, Any],
                        pred: np.ndarray, count: int = 32) -> None:
  """``confusion.png`` and ``predictions.png``: the first ``count`` test images with their
  true and predicted labels, mistakes marked."""
  plots.plot_confusion(np.array(result["confusion_matrix"]), data.class_names, workdir / "confusion.png")
  images, labels = data.test[0][:count], data.test[1][:count]
  names = data.class_names
  titles = [f"{names[t]} / {names[p]}" for t, p in zip(labels, pred[:count])]
  plots.image_grid(images, workdir / "predictions.png", titles=titles, mistakes=labels != pred[:count])


def format_epoch(row: dict[str, Any], num_epochs: int) -> str:
  """``Epoch 3/10 | train_loss .. | train_acc .. | val_loss .. | val_acc .. | 41.2s``."""
  parts = [f"Epoch {row['epoch']}/{num_epochs}", f"train_loss {row['train_loss']:.4f}",
           f"train_acc {row['train_accuracy']:.4f}"]
  if "val_loss" in row:
    parts += [f"val_loss {row['val_loss']:.4f}", f"val_acc {row['val_accuracy']:.4f}"]
  return " | ".join(parts + [f"{row['seconds']:.1f}s"])


def format_test(result: dict[str, Any]) -> str:
  """One line: test accuracy on all examples and on each named subset, and macro F1."""
  parts = [f"Test | loss {result['test_loss']:.4f} | acc {result['accuracy']:.4f} ({result['count']})"]
  parts += [f"acc_{k[len('accuracy_'):]} {v:.4f} ({result['count_' + k[len('accuracy_'):]]})"
            for k, v in result.items() if k.startswith("accuracy_")]
  return " | ".join(parts + [f"macro_f1 {result['macro_f1']:.4f}"])
