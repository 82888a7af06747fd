"""A run's initial variables, from its config, in one place (PyTorch's layer defaults,
``init='torch'``, are drawn with the model's own in ``steps.create_train_state``):
data-dependent init (a model's ``data_init``, e.g. AirbenchNet's whitening), pretrained
weights (``model.pretrained``), another run's (``init_from``) and pretrained classifier rows
for the head (``model.head_classes``).

``initial_state`` applies them to a freshly initialised train state and says in one line each
what initialised what.
"""
import functools
import pathlib
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from flax import traverse_util

from cnnjax import steps, weights
from cnnjax.checkpoint import Checkpoints
from cnnjax.errors import UserError
from cnnjax.models import MODELS, TransferNet


def initial_state(config: ml_collections.ConfigDict, model: nn.Module, state: steps.TrainState,
                  train_images: np.ndarray, normalize: Callable[[jax.Array], jax.Array],
                  image_shape: Sequence[int]) -> tuple[steps.TrainState, list[str]]:
  """``state`` (fresh from ``seed``) with the initial variables ``config`` asks for, and one
  line per source saying what it initialised.

  ``init_from`` (another run's latest params and batch statistics) takes everything, so
  ``init``, ``model.pretrained`` and ``model.head_classes`` are not applied with it; else
  ``init='torch'`` (applied by ``steps.create_train_state``) is said, then
  ``model.pretrained`` loads the weights (a ``TransferNet``'s backbone only), or a model with
  a ``data_init(train_images, normalize)`` method gets the variables it returns; then
  ``model.head_classes`` initialises the head from the pretrained classifier's rows.
  """
  pretrained, head_classes = config.model.pretrained, tuple(config.model.head_classes)
  if config.init_from:
    state, step = init_from_run(state, config.init_from)
    skipped = [k for k, v in (("init", config.init == "torch"), ("model.pretrained", pretrained),
                              ("model.head_classes", head_classes)) if v]
    note = f" ({' and '.join(skipped)} not applied: the run's weights replace them)" if skipped else ""
    return state, [f"Initial weights: all from run {config.init_from} (step {step}){note}"]
  lines = []
  if config.init == "torch":  # drawn by steps.create_train_state
    lines.append("Initial weights: PyTorch's layer defaults, kernels and biases U(+-1/sqrt(fan_in)) "
                 "(init='torch')")
  if pretrained:
    variables = pretrained_variables(model, config.model.name, pretrained, image_shape, config.seed)
    state = with_variables(state, variables, f"weights {pretrained!r}")
    part = "the backbone" if isinstance(model, TransferNet) else "the model"
    lines.append(f"Initial weights: {part} from {pretrained!r}")
  elif hasattr(model, "data_init"):
    state = with_variables(state, model.data_init(train_images, normalize),
                           f"{type(model).__name__}.data_init")
    lines.append(f"Initial weights: {type(model).__name__}.data_init on the training images")
  if head_classes:
    if not (pretrained and isinstance(model, TransferNet)):
      raise UserError(f"config.model.head_classes={head_classes} needs a 'transfer' "
                      "model with pretrained weights and no extract_features")
    state = with_variables(state, classifier_head(model, pretrained, head_classes, image_shape),
                           f"the classifier rows {head_classes} of {pretrained!r}")
    lines.append(f"Initial weights: the head from rows {head_classes} of {pretrained!r}'s classifier")
  return state, lines


def with_variables(state: steps.TrainState, variables: dict[str, Any], source: str,
                   complete: bool = False) -> steps.TrainState:
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
  return state.replace(params=params, batch_stats=batch_stats,
                       opt_state=steps.init_opt_state(state.tx, params))


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
  without = traverse_util.flatten_dict(jax.eval_shape(functools.partial(
      steps.init_variables, model.backbone_model(), (1, *image_shape)), jax.random.key(0))["params"],
      sep="/")
  (last,) = [k for k in ours if k not in without and k.endswith("/kernel")
              and ours[k].shape[-1] == full.num_classes]  # the output layer
  kernel, bias = ours[last], ours[last[:-len("kernel")] + "bias"]
  if max(classes) >= kernel.shape[-1] or min(classes) < 0:
    raise UserError(f"config.model.head_classes={tuple(classes)}; the classifier of "
                    f"{spec!r} has classes 0..{kernel.shape[-1] - 1}")
  index = np.asarray(classes)
  return {"params": {"head": {"output": {"kernel": kernel[:, index], "bias": bias[index]}}}}


def init_from_run(state: steps.TrainState,
                  workdir: str | pathlib.Path) -> tuple[steps.TrainState, int]:
  """``state`` with the params and batch statistics of the latest checkpoint of the run in
  ``workdir`` (e.g. a frozen-backbone run, to fine-tune), fresh optimizer state; and the
  checkpoint's step."""
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
                        f"config.init_from={str(workdir)!r} (step {step})", complete=True), step
