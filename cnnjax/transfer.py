"""Transfer learning: pretrained or another run's weights into a train state, inference mode
for frozen modules, and feature extraction (run the frozen backbone once, cache, train the
head on the features).

Which modules are frozen follows from the optimizer's rules (``optim.frozen_modules``): a
module whose parameters are all frozen runs in inference mode while training (its batch
norms normalise with their running statistics and keep them; its dropout is off), so
freezing a backbone freezes it completely, whatever model it sits in.
"""
import contextlib
import pathlib
import time
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from flax.training import train_state

from cnnjax import weights
from cnnjax.checkpoint import Checkpoints
from cnnjax.data import pipeline
from cnnjax.errors import UserError
from cnnjax.models import MODELS, TransferNet


def frozen_inference(frozen: frozenset[tuple[str, ...]]) -> contextlib.AbstractContextManager:
  """A context in which the modules at the paths in ``frozen`` (see
  ``optim.frozen_modules``) and their submodules run in inference mode even when the model
  is called with ``train=True``: their ``BatchNorm`` layers use and keep their running
  statistics, their ``Dropout`` layers pass inputs through. Wrap the ``apply`` (or the
  traced step) in it."""
  if not frozen:
    return contextlib.nullcontext()

  def intercept(next_fun, args, kwargs, context):
    module = context.module
    if context.method_name == "__call__" and isinstance(module, (nn.BatchNorm, nn.Dropout)):
      path = tuple(module.path)
      if any(path[:i] in frozen for i in range(1, len(path) + 1)):
        if isinstance(module, nn.Dropout):
          return args[0]
        if not module.use_running_average:
          return module.clone(parent=None, use_running_average=True).apply(
              module.variables, *args, **kwargs)
    return next_fun(*args, **kwargs)

  return nn.intercept_methods(intercept)


def with_variables(state: train_state.TrainState, variables: dict[str, Any], source: str,
                   complete: bool = False) -> train_state.TrainState:
  """``state`` with ``variables`` (``{'params': ..., 'batch_stats': ...}``) replacing the
  matching entries, and a fresh optimizer state (step and rng kept).

  Every given variable must exist in ``state`` with the same shape, and with ``complete``
  every variable of ``state`` must be given; else a UserError names ``source`` and the
  mismatched keys.
  """
  ours = {col: traverse_util.flatten_dict(getattr(state, col) or {}, sep="/")
          for col in ("params", "batch_stats")}
  problems = []
  for col, flat in ours.items():
    given = traverse_util.flatten_dict(variables.get(col) or {}, sep="/")
    for key, value in given.items():
      if key not in flat:
        problems.append(f"{col}/{key} {np.shape(value)} (not in the model)")
      elif np.shape(value) != flat[key].shape:
        problems.append(f"{col}/{key} {np.shape(value)} (model {flat[key].shape})")
    if complete:
      problems += [f"{col}/{key} missing" for key in flat if key not in given]
    flat.update(given)
  if problems:
    more = f", ... and {len(problems) - 8} more" if len(problems) > 8 else ""
    raise UserError(f"{source} does not fit the model: {', '.join(problems[:8])}{more}; "
                    "expected the same architecture and head")
  params, batch_stats = (traverse_util.unflatten_dict(ours[col], sep="/") for col in ours)
  return state.replace(params=params, batch_stats=batch_stats, opt_state=state.tx.init(params))


def pretrained_variables(model: nn.Module, model_name: str, spec: str,
                         image_shape: Sequence[int], seed: int) -> dict[str, Any]:
  """Weights ``spec`` (see ``weights.load_pretrained``) converted for ``model``.

  For a ``TransferNet``, those of its backbone, under ``backbone/``; for any other model, all
  of its variables, a head that differs from the file's initialised from ``seed``.
  """
  input_shape = (1, *image_shape)
  if isinstance(model, TransferNet):
    loaded = weights.load_pretrained(model.backbone, spec, model.backbone_model(),
                                     input_shape=input_shape)
    return {col: {"backbone": tree} for col, tree in loaded.items() if tree}
  return weights.load_pretrained(model_name, spec, model, rng=jax.random.PRNGKey(seed),
                                 input_shape=input_shape)


def classifier_head(model: TransferNet, spec: str, classes: Sequence[int],
                    image_shape: Sequence[int]) -> dict[str, Any]:
  """``{'params': {'head': {'output': {kernel, bias}}}}``: the rows ``classes`` of the
  classifier in the pretrained weights ``spec`` of ``model``'s backbone, as its new head's
  output layer (``[D, len(classes)]``, ``[len(classes)]``), in the order of ``classes``.

  The head must be that classifier's shape: no hidden layers, ``len(classes)`` outputs. For
  a dataset whose classes are classes of the pretraining set (ImageNet's ant 310 and bee
  309 for hymenoptera), training starts from the pretrained classifier's decision.
  """
  if model.hidden or model.num_classes != len(classes):
    raise UserError(f"config.model.head_classes={tuple(classes)} initialises a head of "
                    f"{len(classes)} outputs without hidden layers; the model has "
                    f"num_classes={model.num_classes}, hidden={tuple(model.hidden)}")
  full = MODELS[model.backbone]()  # with its pretraining classifier
  loaded = weights.load_pretrained(model.backbone, spec, full, input_shape=(1, *image_shape))
  ours = traverse_util.flatten_dict(loaded["params"], sep="/")
  without = traverse_util.flatten_dict(jax.eval_shape(
      model.backbone_model().init, jax.random.key(0), jnp.zeros((1, *image_shape)))["params"],
      sep="/")
  (last,) = [k for k in ours if k not in without and k.endswith("/kernel")
              and ours[k].shape[-1] == full.num_classes]  # the output layer
  kernel, bias = ours[last], ours[last[:-len("kernel")] + "bias"]
  if max(classes) >= kernel.shape[-1] or min(classes) < 0:
    raise UserError(f"config.model.head_classes={tuple(classes)}; the classifier of "
                    f"{spec!r} has classes 0..{kernel.shape[-1] - 1}")
  index = np.asarray(classes)
  return {"params": {"head": {"output": {"kernel": kernel[:, index], "bias": bias[index]}}}}


def init_from_run(state: train_state.TrainState,
                  workdir: str | pathlib.Path) -> train_state.TrainState:
  """``state`` with the params and batch statistics of the latest checkpoint of the run in
  ``workdir`` (e.g. a frozen-backbone run, to fine-tune); fresh optimizer state."""
  directory = pathlib.Path(workdir) / "checkpoints"
  if not directory.is_dir():
    raise UserError(f"config.init_from={str(workdir)!r} has no checkpoints/; expected the "
                    "--workdir of a finished run")
  checkpoints = Checkpoints(directory)
  step = checkpoints.latest_step()
  if step is None:
    raise UserError(f"config.init_from={str(workdir)!r}: {directory} holds no checkpoint")
  saved = checkpoints.restore_saved(step)
  checkpoints.close()
  return with_variables(state, {"params": saved["params"], "batch_stats": saved.get("batch_stats")},
                        f"config.init_from={str(workdir)!r} (step {step})", complete=True)


def extract_features(backbone: nn.Module, variables: dict[str, Any],
                     normalize: Callable[[jax.Array], jax.Array], splits: Sequence[pipeline.Arrays],
                     batch_size: int) -> list[pipeline.Arrays]:
  """Runs ``backbone`` in inference mode once over each split.

  Args:
    backbone: maps normalised images to features ``[B, D]`` or ``[B, h, w, C]``.
    variables: its variables.
    normalize: uint8 images -> the backbone's float inputs (resizing included).
    splits: ``(images [N, H, W, C] uint8, labels [N])`` each.
    batch_size: images per forward pass.
  Returns:
    ``(features [N, h, w, C] float32, labels [N])`` per split; pooled ``[N, D]`` features
    become ``[N, 1, 1, D]``, so that the training loop takes them as images. A split given
    twice (an image folder's val/ as validation and test split) is run once.
  """
  apply = jax.jit(lambda v, x: backbone.apply(v, normalize(x), train=False))
  done: dict[int, np.ndarray] = {}
  for images, _ in splits:
    if id(images) in done:
      continue
    parts = [np.asarray(apply(variables, jnp.asarray(batch["image"])))[batch["mask"]]
             for batch in pipeline.eval_batches((images, np.zeros(len(images))), batch_size)]
    shape = jax.eval_shape(apply, variables, images[:1]).shape[1:]  # of one image's features
    features = np.concatenate(parts) if parts else np.zeros((0, *shape), np.float32)
    done[id(images)] = features.reshape(len(features), 1, 1, -1) if features.ndim == 2 else features
  return [(done[id(images)], labels) for images, labels in splits]


def feature_extraction(model: nn.Module, pretrained: str | None,
                       normalize: Callable[[jax.Array], jax.Array],
                       splits: Sequence[pipeline.Arrays], *, image_shape: Sequence[int], seed: int,
                       batch_size: int, cache: pathlib.Path | None,
                       fingerprint: str) -> tuple[nn.Module, list[pipeline.Arrays]]:
  """The head of a ``TransferNet`` and its backbone's features of each split.

  The backbone has the weights ``pretrained`` (or a random initialisation from ``seed``)
  and sees images normalised by ``normalize``, of shape ``image_shape`` after it; the
  features are reused from ``cache`` when its ``fingerprint`` matches (``cached_features``).
  """
  if not isinstance(model, TransferNet):
    raise UserError(f"config.extract_features needs a backbone and a head, i.e. "
                    f"config.model.name='transfer'; got {type(model).__name__}")
  backbone = model.backbone_model()

  def compute() -> list[pipeline.Arrays]:
    if pretrained:
      loaded = pretrained_variables(model, "transfer", pretrained, image_shape, seed)
      variables = {col: tree["backbone"] for col, tree in loaded.items()}
    else:
      dummy = jnp.zeros((1, *image_shape), jnp.float32)
      variables = jax.jit(lambda: backbone.init(jax.random.PRNGKey(seed), dummy, train=False))()
    return extract_features(backbone, variables, normalize, splits, batch_size)

  return model.head_model(), cached_features(cache, fingerprint, compute)


def cached_features(path: pathlib.Path | None, fingerprint: str,
                    compute: Callable[[], list[pipeline.Arrays]]) -> list[pipeline.Arrays]:
  """``compute()``'s features, stored in (and reused from) the ``.npz`` at ``path`` while
  ``fingerprint`` (what they were computed from) is unchanged; ``path=None``: no cache."""
  if path is not None and path.is_file():
    with np.load(path) as f:
      if str(f["fingerprint"]) == fingerprint:
        count = len([k for k in f.files if k.startswith("features_")])
        print(f"Features from {path}", flush=True)
        return [(f[f"features_{i}"], f[f"labels_{i}"]) for i in range(count)]
  start = time.time()
  splits = compute()
  print(f"Extracted features {[s[0].shape for s in splits]} in {time.time() - start:.1f}s",
        flush=True)
  if path is not None:
    arrays = {f"{kind}_{i}": a for i, split in enumerate(splits)
              for kind, a in zip(("features", "labels"), split)}
    np.savez(path, fingerprint=np.array(fingerprint), **arrays)
  return splits

