"""A notebook API on the experiments' own run assembly and loop: keyword arguments -> a
config -> ``assemble.build`` -> ``train.fit``; saves are ``Checkpoints`` as a run's.

    learner = cnnjax.Learner("seed_cnn", "cifar10", optimizer="rmsprop", lr=1e-3)
    history = learner.fit(epochs=3)
    learner.evaluate()

Names follow Keras and fastai: ``fit``, ``fit_one_cycle``, ``evaluate``, ``predict``,
``save``/``Learner.load``; ``history.plot()``.
"""
import dataclasses
import functools
import json
import pathlib
import re
from typing import Any, Sequence

import flax.linen as nn
import numpy as np
import optax

from cnnjax import (assemble, evaluate, interpretation, logs, lr_finder, optim, parallel, plots,
                    runtime, steps, train)
from cnnjax import callbacks as callbacks_lib
from cnnjax import config as config_lib
from cnnjax.checkpoint import Checkpoints
from cnnjax.data import sources
from cnnjax.errors import UserError

DataLike = Any  # see Learner's docstring


@dataclasses.dataclass
class History:
  """Per-epoch metrics of a learner's fits: ``rows`` as written to ``metrics.jsonl``."""
  rows: list[dict[str, Any]] = dataclasses.field(default_factory=list)

  def to_dict(self) -> dict[str, list[Any]]:
    """Column -> per-epoch values (a pandas-free table; ``pandas.DataFrame(h.to_dict())``)."""
    return logs.columns(self.rows)

  def to_csv(self, path: str | pathlib.Path) -> pathlib.Path:
    return logs.write_csv(self.rows, path)

  def plot(self, path: str | pathlib.Path | None = None):
    """Loss, accuracy and learning-rate curves: the figure (shown by a notebook), or
    written as a PNG to ``path``."""
    return plots.curves_figure(self.rows) if path is None else plots.plot_curves(self.rows, path)

  def __len__(self) -> int:
    return len(self.rows)

  def __repr__(self) -> str:
    return "\n".join(train.format_epoch(row, self.rows[-1]["epoch"]) for row in self.rows)


def as_dataset(data: DataLike, image_size: int | None = None) -> sources.Dataset:
  """Any of the accepted data forms as an in-memory ``sources.Dataset``."""
  if isinstance(data, sources.Dataset):
    return data
  if isinstance(data, (str, pathlib.Path)):
    return sources.load(str(data)) if image_size is None else sources.load(str(data), image_size=image_size)
  if isinstance(data, dict) and "train" in data:
    test = data.get("test", (np.zeros((0, *np.shape(data["train"][0])[1:]), np.uint8), np.zeros(0, np.int64)))
    train_split = sources.checked_arrays("train", *data["train"])
    test_split = sources.checked_arrays("test", *test)
    num_classes = int(max(train_split[1].max(initial=0), test_split[1].max(initial=0))) + 1
    return sources.Dataset(train_split, test_split, data.get("class_names", [str(i) for i in range(num_classes)]))
  if isinstance(data, (tuple, list)) and len(data) == 2:
    return as_dataset({"train": tuple(data)})
  if hasattr(data, "__getitem__") and hasattr(data, "__len__"):  # grain MapDataset / random-access source
    records = [data[i] for i in range(len(data))]
    return as_dataset({"train": (np.stack([r["image"] for r in records]), np.array([r["label"] for r in records]))})
  raise UserError(f"data of type {type(data).__name__} is not supported; expected (images, labels) arrays, "
                  "{'train': ..., 'test': ...}, an .npz path, a TFDS name, an image folder or a grain dataset")


class Learner:
  """A model, its data and optimizer, trained by the same loop as the experiments.

  Args:
    model: a registered model name (``cnnjax.models.MODELS``) or a ``flax.linen`` module
      called as ``model(x, train=...)`` returning logits ``[B, K]``.
    data: ``(images [N, H, W, C] uint8, labels [N])``; ``{'train': (x, y), 'test': (x, y)}``;
      an ``.npz`` path; a TFDS name; an image folder (needs ``image_size``); a grain
      dataset of ``{'image', 'label'}`` records; or a ``sources.Dataset``.
    optimizer: one of ``optim.OPTIMIZERS``; its other options (momentum, weight_decay,
      ...) as keyword arguments in ``optimizer_options``.
    lr: the learning rate.
    loss: 'cross_entropy' (softmax, integer labels).
    batch_size, eval_batch_size, val_size (examples, or a fraction if < 1), seed,
    label_smoothing, augment (``KerasAugment`` options, e.g. ``{'crop_padding': 4,
    'horizontal_flip': True}``): as the config keys of the same names.
    normalize: True: per-channel stats of the training split; False: pixels / 255; or a
      ``data.normalization`` name ('imagenet', 'lite') matching pretrained weights.
    num_classes: the model's outputs when ``model`` is a name (default: from the labels).
    model_options: the named model's other options, e.g. ``{'backbone':
      'efficientnet_lite0'}`` for 'transfer'.
    pretrained: initial weights as ``model.pretrained`` ('torchvision', 'package' or a
      file); a 'transfer' model's backbone gets them. As fastai's ``vision_learner``, a
      learner with pretrained weights starts frozen (``freeze()``: the head alone trains, and
      ``lr_find`` finds the head's rate) until ``unfreeze()`` or ``fine_tune``.
    precision: 'auto' (bfloat16 on GPU/TPU, float32 on CPU), 'float32' or 'bfloat16' (mixed
      precision: bf16 compute, float32 parameters, optimizer state, statistics and loss;
      float32 on a CPU without bf16 instructions).
    ema: > 0, e.g. 0.999: evaluate, predict and save a moving average of the weights.
  """

  def __init__(self, model: str | nn.Module, data: DataLike, optimizer: str = "adam", lr: float = 1e-3,
               loss: str = "cross_entropy", *, batch_size: int = 128, eval_batch_size: int = 500,
               val_size: float = 0.2, seed: int = 0, label_smoothing: float = 0.0,
               augment: dict[str, Any] | None = None, normalize: bool | str = True,
               num_classes: int | None = None, image_size: int | None = None,
               optimizer_options: dict[str, Any] | None = None,
               model_options: dict[str, Any] | None = None, pretrained: str | None = None,
               precision: str = "auto", ema: float = 0.0):
    if loss != "cross_entropy":
      raise UserError(f"unknown loss {loss!r}; expected 'cross_entropy'")
    for name, value, low, integer in (("batch_size", batch_size, 1, True),
                                      ("eval_batch_size", eval_batch_size, 1, True),
                                      ("val_size", val_size, 0, False)):
      config_lib.check_number(name, value, low, integer=integer)
    config_lib.check_number("lr", lr, 0, low_open=True)
    config_lib.check_number("label_smoothing", label_smoothing, 0, 1, high_open=True)
    config_lib.check_number("ema", ema, 0, 1, high_open=True)
    if precision not in runtime.PRECISIONS:
      raise UserError(f"precision={precision!r}; expected one of {list(runtime.PRECISIONS)}")
    runtime.configure()
    self.data = as_dataset(data, image_size)
    labels_max = int(self.data.train[1].max(initial=-1))
    num_classes = num_classes or max(len(self.data.class_names), labels_max + 1)
    c = config_lib.default_config()
    c.model.num_classes = num_classes
    if isinstance(model, str):
      c.model.name = model
      c.model.update(model_options or {})
    c.model.pretrained = pretrained
    c.optimizer.update({"name": optimizer, "lr": lr, **(optimizer_options or {})})
    c.update({"batch_size": batch_size, "eval_batch_size": eval_batch_size, "seed": seed,
              "label_smoothing": label_smoothing, "num_epochs": 1, "precision": precision,
              "ema": float(ema)})
    c.data.val_size = float(val_size)
    c.data.augment.update(augment or {})
    c.data.normalization = normalize if isinstance(normalize, str) else (
        "dataset" if normalize else "unit")
    self.config = c
    self.model_spec = ({"name": model, "num_classes": num_classes, **(model_options or {})}
                       if isinstance(model, str) else None)
    self.run = assemble.build(c, data=self.data, model=None if isinstance(model, str) else model)
    self.history = History()
    self._opt_start = 0  # state.step at which the optimizer state (and its step count) restarted
    self._schedule = optax.constant_schedule(lr)
    self._set_schedule(self._schedule)
    self.state = self.run.runner.put_state(self.state)
    if pretrained:
      self.freeze()

  @property
  def model(self) -> nn.Module:
    return self.run.model

  @property
  def train_data(self):
    return self.run.train

  @property
  def val_data(self):
    return self.run.val

  @property
  def state(self) -> steps.TrainState:
    return self.run.state

  @state.setter
  def state(self, state: steps.TrainState) -> None:
    self.run.state = state

  @property
  def steps_per_epoch(self) -> int:
    return self.run.steps_per_epoch

  @property
  def epoch(self) -> int:
    """Epochs trained so far (over all calls to ``fit``)."""
    return int(self.state.step) // self.steps_per_epoch

  def fit(self, epochs: int, lr: float | None = None,
          callbacks: Sequence[callbacks_lib.Callback] = ()) -> History:
    """Trains ``epochs`` more epochs at a constant ``lr`` (default: the learner's), with
    ``callbacks`` (``cnnjax.callbacks``, e.g. ``EarlyStopping``); returns the whole history."""
    lr = self.config.optimizer.lr if lr is None else lr
    config_lib.check_number("lr", lr, 0, low_open=True)
    self._set_schedule(optax.constant_schedule(lr))
    return self._run(epochs, callbacks)

  def _run(self, epochs: int, callbacks: Sequence[callbacks_lib.Callback]) -> History:
    config_lib.check_number("epochs", epochs, 1, integer=True)
    c = self.config
    log = _Log(self.history, self.epoch + epochs)
    state = train.fit(self.run.runner, self.state, self.train_data, self.val_data,
                      num_epochs=self.epoch + epochs, batch_size=c.batch_size,
                      eval_batch_size=c.eval_batch_size, seed=c.seed, augment=self.run.augment,
                      schedule=self._schedule, callbacks=[log, *callbacks])
    self.state = self.run.runner.put_state(state)  # a callback may have given host arrays
    return self.history

  def fit_one_cycle(self, epochs: int, max_lr: float, pct_start: float = 0.25,
                    div_factor: float = 25.0,
                    callbacks: Sequence[callbacks_lib.Callback] = ()) -> History:
    """``epochs`` more epochs of a one-cycle (cosine) schedule peaking at ``max_lr`` (from
    ``max_lr / div_factor``); the optimizer keeps its moments (as fastai's ``fit_one_cycle``)."""
    config_lib.check_number("max_lr", max_lr, 0, low_open=True)
    config_lib.check_number("pct_start", pct_start, 0, 1, low_open=True, high_open=True)
    config_lib.check_number("div_factor", div_factor, 0, low_open=True)
    start = int(self.state.step) - self._opt_start  # schedules see the optimizer's own count
    cfg = config_lib.default_schedule_config()
    cfg.update({"name": "one_cycle", "pct_start": pct_start, "div_factor": div_factor})
    cycle = optim.make_schedule(cfg, max_lr, epochs * self.steps_per_epoch)
    self._set_schedule(lambda step: cycle(step - start))
    return self._run(epochs, callbacks)

  def fine_tune(self, epochs: int, base_lr: float = 2e-3, freeze_epochs: int = 1,
                lr_mult: float = 100.0,
                callbacks: Sequence[callbacks_lib.Callback] = ()) -> History:
    """fastai's ``fine_tune`` for a pretrained model: ``freeze_epochs`` one-cycle epochs of
    the head alone at ``base_lr`` (``freeze()``), then ``unfreeze()`` and ``epochs`` one-cycle
    epochs at ``base_lr / 2`` for the head and ``base_lr / 2 / lr_mult`` for the rest
    (discriminative rates), starting from a fifth of that (``div_factor=5``)."""
    config_lib.check_number("freeze_epochs", freeze_epochs, 0, integer=True)
    config_lib.check_number("lr_mult", lr_mult, 1)
    if freeze_epochs:
      self.freeze()
      self.fit_one_cycle(freeze_epochs, base_lr, pct_start=0.99, callbacks=callbacks)
    head = re.escape(list(self.state.params)[-1])
    self._set_groups((f"(?!{head}/).*:{1 / lr_mult:g}", f"{head}/.*:1.0"))
    return self.fit_one_cycle(epochs, base_lr / 2, pct_start=0.3, div_factor=5.0,
                              callbacks=callbacks)

  def freeze(self, groups: Sequence[str] | None = None) -> None:
    """Freezes parameters for transfer learning: by ``optim.group_labels`` rules
    (``'regex:frozen'`` / ``'regex:<lr multiplier>'`` over paths such as
    ``'backbone/layer4_1/conv2/kernel'``), by default everything but the last top-level
    module (the head). Frozen parameters get no update and no optimizer state, and the
    modules frozen whole run batch norm in inference mode. The optimizer state restarts."""
    if groups is None:
      head = re.escape(list(self.state.params)[-1])
      groups = (f"(?!{head}/).*:frozen", f"{head}/.*:1.0")
    self._set_groups(tuple(groups))

  def unfreeze(self) -> None:
    """Trains every parameter again (the optimizer state restarts)."""
    self._set_groups(())

  def _set_groups(self, groups: tuple[str, ...]) -> None:
    c = self.config
    c.optimizer.groups = groups
    frozen = optim.frozen_modules(self.state.params, groups)
    self.run.runner = steps.Runner.for_config(c, self.run.normalize, self.run.runner.mesh, frozen)
    tx = optim.make_optimizer(c.optimizer, self._schedule)
    opt_state = steps.init_opt_state(tx, self.state.params)
    self.state = self.run.runner.put_state(self.state.replace(tx=tx, opt_state=opt_state))
    self._opt_start = int(self.state.step)

  def lr_find(self, sweep: lr_finder.Sweep = lr_finder.Sweep()) -> lr_finder.LRCurve:
    """The learning-rate range test from the current weights (left untouched); the curve
    has ``.suggested`` (fastai's valley), ``.lr_steepest``, ``.lr_min_div10`` and
    ``.write(dir)`` (plot + JSON)."""
    c = self.config
    batches = lr_finder.sweep_batches(self.train_data, c.batch_size, c.seed, self.run.augment)
    return lr_finder.lr_sweep(self.run.runner, self.state, batches,
                              functools.partial(optim.make_optimizer, c.optimizer), sweep)

  def _set_schedule(self, schedule: optax.Schedule) -> None:
    """Swaps the learning-rate schedule; the optimizer state's structure does not depend
    on it, so the moments carry over."""
    self._schedule = schedule
    self.state = self.state.replace(tx=optim.make_optimizer(self.config.optimizer, schedule))

  def evaluate(self, data: DataLike | None = None) -> interpretation.Metrics:
    """Test metrics (as ``test_metrics.json``, a dict shown as a per-class table) on the
    learner's test split, on ``(images, labels)``, or on the test split of any other
    accepted data form."""
    if data is None:
      dataset = self.data
    elif isinstance(data, (tuple, list)):
      dataset = dataclasses.replace(self.data, test=sources.checked_arrays("data", *data), test_subsets={})
    else:
      dataset = dataclasses.replace(as_dataset(data), class_names=self.data.class_names)
    if not len(dataset.test[1]):
      raise UserError("no test data: pass (images, labels) to evaluate() or data with a test split")
    result, _ = evaluate.test_report(dataclasses.replace(self.run, data=dataset), self.state)
    return interpretation.Metrics(result)

  def interpret(self, data: DataLike | None = None) -> interpretation.ClassificationInterpretation:
    """The predictions on the test split (or on ``data``'s, or on ``(images, labels)``) to
    look at: ``most_confused``, ``plot_top_losses``, ``plot_confusion_matrix``, ``table``."""
    if data is None:
      images, labels = self.data.test if len(self.data.test[1]) else self.val_data
    elif isinstance(data, (tuple, list)):
      images, labels = sources.checked_arrays("data", *data)
    else:
      images, labels = as_dataset(data).test
    if not len(labels):
      raise UserError("no labelled data to interpret: pass (images, labels) or data with a test split")
    probs = evaluate.probabilities(self.run, self.state, images, "Interpret")
    return interpretation.ClassificationInterpretation(probs, labels, images, self.data.class_names)

  def predict(self, images: np.ndarray, batch_size: int | None = None) -> np.ndarray:
    """Class probabilities ``[N, K]`` for uint8 images ``[N, H, W, C]``; ``[K]`` for one
    image ``[H, W, C]`` (``[H, W]`` if grey)."""
    images, shape = np.asarray(images), self.data.image_shape
    one = images.shape == shape or (shape[-1] == 1 and images.shape == shape[:-1])
    if one:
      images = images.reshape(1, *shape)
    if batch_size is not None:
      config_lib.check_number("batch_size", batch_size, 1, integer=True)
    images = sources.checked_arrays("images", images, np.zeros(len(images), np.int64))[0]
    if images.shape[1:] != shape:
      raise UserError(f"images have shape {images.shape[1:]}; expected [N, {', '.join(map(str, shape))}] "
                      f"or one image {shape}, as trained")
    if not len(images):
      return np.zeros((0, self.config.model.num_classes), np.float32)
    probs = steps.predict_proba(self.state, self.run.normalize, images,
                                batch_size or self.config.eval_batch_size, mesh=self.run.runner.mesh,
                                dtype=self.run.runner.dtype)
    return probs[0] if one else probs

  def save(self, path: str | pathlib.Path) -> pathlib.Path:
    """Writes the train state (``Checkpoints``, as a run's) and what ``Learner.load`` needs
    to rebuild it (``learner.json``) in the directory ``path``: a new one, or an earlier save
    (updated)."""
    path = pathlib.Path(path).absolute()
    if path.exists() and not path.is_dir():
      raise UserError(f"{path} is a file; expected a directory to save the learner in")
    if path.is_dir() and any(path.iterdir()) and not (path / "learner.json").exists():
      raise UserError(f"{path} holds other files; expected a new directory or an earlier save")
    checkpoints = Checkpoints(path / "checkpoints")
    checkpoints.save(int(self.state.step), self.state)
    checkpoints.wait()
    checkpoints.close()
    mean, std = self.run.stats
    meta = {"model": self.model_spec, "optimizer": self.config.optimizer.to_dict(),
            "mean": np.asarray(mean).tolist(), "std": np.asarray(std).tolist(),
            "class_names": self.data.class_names, "image_shape": list(self.data.image_shape),
            "history": self.history.rows, "precision": self.config.precision,
            "ema": self.config.ema}
    (path / "learner.json").write_text(json.dumps(meta, indent=2))
    return path

  @classmethod
  def load(cls, path: str | pathlib.Path, data: DataLike | None = None,
           model: nn.Module | None = None, **kwargs) -> "Learner":
    """A learner saved by ``save``: the same model, optimizer state and history.

    ``data`` defaults to a placeholder of the saved image shape (enough for ``predict``);
    ``model`` is needed when the learner was built from a module rather than a name.
    """
    path = pathlib.Path(path).absolute()
    if not (path / "learner.json").exists():
      raise UserError(f"{path} holds no saved learner (no learner.json); expected a path given to save()")
    meta = json.loads((path / "learner.json").read_text())
    if model is None and meta["model"] is None:
      raise UserError(f"{path} was saved from a custom module: pass it as Learner.load(path, model=...)")
    if data is None:  # enough placeholder images for one batch of every class
      k = len(meta["class_names"])
      n = max(2 * k, kwargs.setdefault("batch_size", 128))
      data = {"train": (np.zeros((n, *meta["image_shape"]), np.uint8), np.arange(n) % k),
              "class_names": meta["class_names"]}
    opt = meta["optimizer"]
    kwargs.setdefault("val_size", 0)
    kwargs.setdefault("precision", meta.get("precision", "auto"))  # saves before these keys:
    kwargs.setdefault("ema", meta.get("ema", 0.0))  # their defaults
    options = {k: tuple(v) if isinstance(v, list) else v  # JSON has no tuples
               for k, v in (meta["model"] or {}).items() if k not in ("name", "num_classes")}
    learner = cls(model or meta["model"]["name"], data, opt.pop("name"), opt.pop("lr"),
                  optimizer_options=opt, num_classes=len(meta["class_names"]),
                  model_options=options or None, **kwargs)
    learner.run = learner.run.with_stats(np.array(meta["mean"], np.float32),
                                         np.array(meta["std"], np.float32))
    checkpoints = Checkpoints(path / "checkpoints")
    step = checkpoints.latest_step()
    if step is None:
      raise UserError(f"{path}/checkpoints holds no saved state; expected a path given to save()")
    learner.state = checkpoints.restore(step, learner.state,
                                        parallel.replicated(learner.run.runner.mesh))
    checkpoints.close()
    learner.history = History(meta["history"])
    return learner


class _Log(callbacks_lib.Callback):
  """Appends each epoch's row to the learner's history and prints its line."""

  def __init__(self, history: History, last_epoch: int):
    self.history, self.last_epoch = history, last_epoch

  def on_epoch_end(self, state: steps.TrainState, row: dict[str, Any]) -> None:
    self.history.rows.append(row)
    print(train.format_epoch(row, self.last_epoch), flush=True)


__all__ = ["Learner", "History", "as_dataset"]
