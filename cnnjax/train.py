"""The one training loop: train state, compiled steps, epochs, evaluation, checkpoints.

``train_and_evaluate(config, workdir)`` runs a whole experiment; the experiments, the
notebook API and the LR finder all build on the pieces below.

A workdir holds: ``config.json``, ``metrics.jsonl`` (one line per epoch), ``curves.png``,
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
from flax.training import train_state

from cnnjax import metrics as metrics_lib
from cnnjax import optim, parallel, plots
from cnnjax.checkpoint import Checkpoints
from cnnjax.data import augment as augment_lib
from cnnjax.data import pipeline, sources
from cnnjax.errors import UserError
from cnnjax.models import create_model

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


def make_normalize(mean: np.ndarray, std: np.ndarray) -> Callable[[jax.Array], jax.Array]:
  """uint8 images ``[B, H, W, C]`` -> float32 ``(x - mean) / std`` (stats in pixel units ``[C]``)."""
  mean, std = jnp.asarray(mean, jnp.float32), jnp.asarray(std, jnp.float32)
  return lambda images: (images.astype(jnp.float32) - mean) / std


def _variables(state: TrainState, params: Any) -> dict[str, Any]:
  return {"params": params, "batch_stats": state.batch_stats} if state.batch_stats else {"params": params}


def make_train_step(normalize: Callable[[jax.Array], jax.Array], label_smoothing: float = 0.0):
  """``train_step(state, batch) -> (state, sums)``: one optimizer step on a batch.

  ``sums`` holds ``loss`` (summed over the batch), ``correct`` and ``count``, so epochs
  accumulate exact means. Dropout uses ``fold_in(state.rng, state.step)``; batch norm
  runs in train mode and its new statistics replace the old.
  """
  def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
    images, labels = normalize(batch["image"]), batch["label"]
    chex.assert_rank(images, 4)
    dropout_rng = jax.random.fold_in(state.rng, state.step)

    def loss_fn(params):
      logits, updates = state.apply_fn(_variables(state, params), images, train=True,
                                       rngs={"dropout": dropout_rng}, mutable=["batch_stats"])
      loss = cross_entropy(logits, labels, label_smoothing)
      return loss.mean(), (loss, logits, updates)

    grads, (loss, logits, updates) = jax.grad(loss_fn, has_aux=True)(state.params)
    state = state.apply_gradients(grads=grads,
                                  batch_stats=updates.get("batch_stats", state.batch_stats))
    sums = {"loss": loss.sum(), "correct": (logits.argmax(-1) == labels).sum(),
            "count": jnp.asarray(labels.shape[0])}
    return state, sums
  return train_step


def make_eval_step(normalize: Callable[[jax.Array], jax.Array]):
  """``eval_step(state, batch) -> out``: batch norm in inference mode, padding masked.

  ``out`` holds ``loss``/``correct``/``count`` sums over real examples, ``pred`` ``[B]``
  (argmax class) and ``mask`` ``[B]`` (False on padding rows).
  """
  def eval_step(state: TrainState, batch: Batch) -> dict[str, jax.Array]:
    logits = state.apply_fn(_variables(state, state.params), normalize(batch["image"]), train=False)
    mask = batch["mask"]
    loss = cross_entropy(logits, batch["label"])
    pred = logits.argmax(-1)
    return {"loss": jnp.where(mask, loss, 0.0).sum(), "correct": ((pred == batch["label"]) & mask).sum(),
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
             mesh: jax.sharding.Mesh | None = None) -> "Runner":
    mesh = mesh or parallel.make_mesh()
    rep, data = parallel.replicated(mesh), parallel.data_sharding(mesh)
    train_step = jax.jit(make_train_step(normalize, label_smoothing), in_shardings=(rep, data),
                         out_shardings=(rep, rep), donate_argnums=0)
    eval_step = jax.jit(make_eval_step(normalize), in_shardings=(rep, data), out_shardings=rep)
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


def _progress(total: int, initial: int, desc: str):
  """A tqdm bar inside the epoch in a terminal or a Jupyter notebook; else (logs) nothing."""
  if not (sys.stdout.isatty() or "ipykernel" in sys.modules) or jax.process_index() != 0:
    return None
  from tqdm.auto import tqdm
  return tqdm(total=total, initial=initial, desc=desc, leave=False, dynamic_ncols=True)


def _read_history(path: pathlib.Path, up_to_epoch: int) -> list[dict[str, Any]]:
  """Per-epoch rows already logged, for epochs ``<= up_to_epoch`` (the checkpointed ones)."""
  if not path.exists():
    return []
  rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
  return [r for r in rows if r["epoch"] <= up_to_epoch]


def _write_jsonl(path: pathlib.Path, rows: list[dict[str, Any]]) -> None:
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def make_augment(cfg: ml_collections.ConfigDict) -> pipeline.BatchAugment | None:
  """The configured Keras-style batch augmentation, or None when every option is off."""
  augment = augment_lib.KerasAugment.from_config(cfg.to_dict())
  return None if augment == augment_lib.KerasAugment() else augment


def _check_workdir_config(workdir: pathlib.Path, config: ml_collections.ConfigDict) -> None:
  """A workdir with checkpoints of a different model or data shape cannot be resumed."""
  path = workdir / "config.json"
  if not path.exists():
    return
  saved = json.loads(path.read_text())
  for key in ("model", "data"):
    if saved.get(key) != json.loads(config[key].to_json()):
      raise UserError(f"workdir {workdir} holds a run with a different config.{key} "
                      f"({saved.get(key)}); use a new --workdir or the same config")


@dataclasses.dataclass
class Setup:
  """What a run builds from its config before the first step.

  Attributes:
    data: the train and test splits as loaded.
    train, val: the training split after the validation split was taken off.
    runner: the compiled steps on the device mesh.
    state: a freshly initialised train state (on the host).
    schedule: the learning rate per step.
    steps_per_epoch: training batches per epoch (the remainder is dropped).
  """
  data: sources.Dataset
  train: pipeline.Arrays
  val: pipeline.Arrays
  runner: Runner
  state: TrainState
  schedule: optax.Schedule
  steps_per_epoch: int


def setup(config: ml_collections.ConfigDict) -> Setup:
  """Loads and splits the data, builds the model, optimizer, steps and initial state."""
  data = sources.load(config.data.source, config.data.tfds_data_dir)
  if config.data.limit:
    data = data.head(config.data.limit)
  num_classes = config.model.num_classes
  labels_max = int(max(data.train[1].max(), data.test[1].max()))
  if labels_max >= num_classes:
    raise UserError(f"data has label {labels_max} but config.model.num_classes={num_classes}; "
                    f"expected labels in [0, {num_classes})")
  train_data, val_data = pipeline.split_validation(*data.train, config.data.val_size, config.seed)
  mean, std = pipeline.channel_stats(train_data[0])
  mesh = parallel.make_mesh()
  parallel.check_batch_size(config.batch_size, mesh)
  steps_per_epoch = len(train_data[0]) // config.batch_size
  schedule = optim.make_schedule(config.schedule, config.optimizer.lr,
                                 steps_per_epoch * config.num_epochs)
  tx = optim.make_optimizer(config.optimizer, schedule)
  model = create_model(**config.model)
  runner = Runner.create(make_normalize(mean, std), config.label_smoothing, mesh)
  state = create_train_state(model, tx, data.image_shape, config.seed)
  return Setup(data, train_data, val_data, runner, state, schedule, steps_per_epoch)


def fit(runner: Runner, state: TrainState, train_data: pipeline.Arrays, val_data: pipeline.Arrays, *,
        num_epochs: int, batch_size: int, eval_batch_size: int, seed: int,
        augment: pipeline.BatchAugment | None, schedule: optax.Schedule,
        on_epoch_end: Callable[[TrainState, dict[str, Any]], None] = lambda state, row: None,
        stop: "StopRequested | None" = None, log_every_steps: int = 10) -> TrainState:
  """The epoch loop, from ``state.step`` (mid-epoch after a resume) to ``num_epochs``.

  Each epoch trains on ``pipeline.train_epoch(train_data, ..., seed, epoch)``, evaluates
  on ``val_data`` (if any) and calls ``on_epoch_end(state, row)`` with the epoch's
  metrics row (``epoch, step, train_loss, train_accuracy, val_loss, val_accuracy, lr,
  seconds``). Returns the final state, or the state at the step where ``stop`` was
  requested (check ``stop.requested``).
  """
  steps_per_epoch = len(train_data[0]) // batch_size
  shard = parallel.process_shard()
  for epoch in range(int(state.step) // steps_per_epoch, num_epochs):
    first = int(state.step) - epoch * steps_per_epoch
    batches = pipeline.train_epoch(train_data, batch_size, seed, epoch, augment, shard)
    bar = _progress(steps_per_epoch, first, f"Epoch {epoch + 1}/{num_epochs}")
    sums = {"loss": 0.0, "correct": 0, "count": 0}
    start = time.time()
    for k, batch in enumerate(pipeline.prefetch(batches[first:]), start=first):
      state, step_sums = runner.train_step(state, runner.to_global(batch))
      sums = jax.tree.map(jnp.add, sums, step_sums)
      if bar is not None and (k + 1) % log_every_steps == 0:
        bar.set_postfix(loss=f"{float(sums['loss']) / int(sums['count']):.4f}")
        bar.update(log_every_steps)
      if stop is not None and stop.requested:
        break
    if bar is not None:
      bar.close()
    if stop is not None and stop.requested:
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
    (workdir / "config.json").write_text(config.to_json(indent=2))

  s = setup(config)
  checkpoints = Checkpoints(ckpt_dir)
  state = s.state
  start_step = checkpoints.latest_step() or 0
  if start_step:
    state = checkpoints.restore(start_step, state)
    print(f"Resumed from {ckpt_dir}/{start_step} (epoch {start_step // s.steps_per_epoch + 1}, "
          f"batch {start_step % s.steps_per_epoch})", flush=True)
  history = _read_history(workdir / "metrics.jsonl", start_step // s.steps_per_epoch)

  def on_epoch_end(state: TrainState, row: dict[str, Any]) -> None:
    history.append(row)
    checkpoints.save(row["step"], state, {"val_loss": row.get("val_loss", row["train_loss"])})
    if is_main:
      print(format_epoch(row, config.num_epochs), flush=True)
      _write_jsonl(workdir / "metrics.jsonl", history)
      plots.plot_curves(history, workdir / "curves.png")

  with StopRequested() as stop:
    state = fit(s.runner, s.runner.put_state(state), s.train, s.val, num_epochs=config.num_epochs,
                batch_size=config.batch_size, eval_batch_size=config.eval_batch_size,
                seed=config.seed, augment=make_augment(config.data.augment), schedule=s.schedule,
                on_epoch_end=on_epoch_end, stop=stop, log_every_steps=config.log_every_steps)
  if stop.requested:
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
    write_test_pictures(workdir, s.data, result, pred)
    print(format_test(result), flush=True)
  return result


def restore_run(workdir: str | pathlib.Path, which: str = "best") -> tuple[ml_collections.ConfigDict, Setup]:
  """The config and setup of a finished (or interrupted) run, with ``setup.state`` restored
  from its ``'best'`` (lowest validation loss) or ``'latest'`` checkpoint, on the mesh."""
  workdir = pathlib.Path(workdir)
  path = workdir / "config.json"
  if not path.exists():
    raise UserError(f"{workdir} is not a run directory: no config.json; expected the --workdir "
                    "of a finished experiment")
  config = ml_collections.ConfigDict(json.loads(path.read_text()))
  s = setup(config)
  checkpoints = Checkpoints(workdir / "checkpoints")
  step = checkpoints.best_step() if which == "best" else checkpoints.latest_step()
  if step is None:
    raise UserError(f"{workdir}/checkpoints holds no checkpoint to restore")
  s.state = s.runner.put_state(checkpoints.restore(step, s.state))
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
