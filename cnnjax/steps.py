"""The compiled pieces of a run: train state, the one init, losses, normalisation, train and
eval steps, test-time views, and the one batched-inference loop (``map_batches`` /
``apply_batched``) that evaluation, predict, feature extraction, report and zero-shot use.
"""
import dataclasses
import functools
from collections.abc import Callable, Iterator
from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state

from cnnjax import optim, parallel, progress
from cnnjax.data import pipeline
from cnnjax.errors import UserError

Batch = dict[str, jax.Array]
LOSSES = ("cross_entropy", "binary_cross_entropy")


class TrainState(train_state.TrainState):
  """params, opt_state and step (from flax), plus batch-norm statistics and the rng
  from which each step's dropout key is folded (raw uint32 key, so orbax can save it)."""
  batch_stats: Any
  rng: jax.Array


def init_variables(model: nn.Module, input_shape: tuple[int, ...], rng: jax.Array) -> dict[str, Any]:
  """``model.init`` on zeros of ``input_shape`` ``[B, H, W, C]`` in inference mode (jitted);
  a shape the model cannot take is a UserError naming it.

  Compiled at LLVM -O0: it runs once, and -O3 took 3-7 s of a run's start-up on CPU (-O0:
  0.4-2 s). The values agree with -O3's to an ulp or so (FMA contraction in the
  truncated-normal sampler)."""
  dummy = jnp.zeros(input_shape, jnp.float32)
  try:
    init = jax.jit(lambda r: model.init(r, dummy, train=False))
    if isinstance(rng, jax.core.Tracer):  # under eval_shape or jit: traced, not compiled here
      return init(rng)
    return init.lower(rng).compile({"xla_backend_optimization_level": "0"})(rng)
  except (TypeError, ValueError, ZeroDivisionError) as e:  # shape errors: input does not fit
    first = str(e).strip().splitlines()[0][:200]
    raise UserError(f"images of shape {tuple(input_shape[1:])} do not fit model "
                    f"{type(model).__name__} ({first})") from e


def create_train_state(model: nn.Module, tx: optax.GradientTransformation,
                       image_shape: tuple[int, ...], seed: int) -> TrainState:
  """Initialises ``model`` for images ``[H, W, C]`` and wraps it with optimizer ``tx``."""
  init_rng, rng = jax.random.split(jax.random.PRNGKey(seed))
  variables = init_variables(model, (1, *image_shape), init_rng)
  return TrainState.create(apply_fn=model.apply, params=variables["params"], tx=tx,
                           batch_stats=variables.get("batch_stats", {}), rng=rng)


def model_variables(state: TrainState, params: Any = None) -> dict[str, Any]:
  """``{'params': ..., 'batch_stats': ...}`` of ``state`` (``params`` instead of its own if
  given), for ``model.apply``."""
  params = state.params if params is None else params
  return {"params": params, "batch_stats": state.batch_stats} if state.batch_stats else {"params": params}


def cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0) -> jax.Array:
  """Per-example softmax cross-entropy. logits ``[B, K]``, integer labels ``[B]`` -> ``[B]``."""
  targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), label_smoothing)
  return optax.softmax_cross_entropy(logits, targets)


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


def probabilities(logits: jax.Array, loss: str = "cross_entropy") -> jax.Array:
  """Class probabilities ``[B, K]`` from logits: softmax of ``[B, K]`` for
  'cross_entropy'; for 'binary_cross_entropy' the one sigmoid logit ``[B, 1]`` gives
  ``[1 - p, p]`` ``[B, 2]`` (class 1 is the positive class)."""
  if loss == "binary_cross_entropy":
    p = jax.nn.sigmoid(logits[:, :1])
    return jnp.concatenate([1.0 - p, p], axis=-1)
  return jax.nn.softmax(logits)


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


def make_train_step(normalize: Callable[[jax.Array], jax.Array], label_smoothing: float = 0.0,
                    loss: str = "cross_entropy",
                    frozen: frozenset[tuple[str, ...]] = frozenset()):
  """``train_step(state, batch) -> (state, sums)``: one optimizer step on a batch.

  ``sums`` holds ``loss`` (summed over the batch), ``correct`` and ``count``, so epochs
  accumulate exact means. Dropout uses ``fold_in(state.rng, state.step)``; batch norm
  runs in train mode and its new statistics replace the old, except in the ``frozen``
  modules (``optim.frozen_modules``), which run in inference mode and keep theirs
  (``optim.frozen_inference``). ``loss``: one of LOSSES.
  """
  def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
    images, labels = normalize(batch["image"]), batch["label"]
    chex.assert_rank(images, 4)
    dropout_rng = jax.random.fold_in(state.rng, state.step)

    def loss_fn(params):
      with optim.frozen_inference(frozen):
        logits, updates = state.apply_fn(model_variables(state, params), images, train=True,
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


def make_predict(normalize: Callable[[jax.Array], jax.Array], flip: bool = False,
                 shift: int = 0) -> Callable[[TrainState, jax.Array], jax.Array]:
  """``logits(state, images)``: logits ``[B, K]`` of uint8 images ``[B, H, W, C]``, batch
  norm in inference mode, averaged over the test-time views (``test_time_logits``)."""
  def logits(state: TrainState, images: jax.Array) -> jax.Array:
    def logits_of(x: jax.Array) -> jax.Array:
      return state.apply_fn(model_variables(state), normalize(x), train=False)
    return test_time_logits(logits_of, images, flip, shift)
  return logits


def make_eval_step(normalize: Callable[[jax.Array], jax.Array], loss: str = "cross_entropy",
                   flip: bool = False, shift: int = 0):
  """``eval_step(state, batch) -> out``: batch norm in inference mode, padding masked.

  ``out`` holds ``loss``/``correct``/``count`` sums over real examples, ``pred`` ``[B]``
  (predicted class, see ``loss_and_prediction``) and ``mask`` ``[B]`` (False on padding rows).
  ``flip``, ``shift``: test-time augmentation, see ``test_time_logits``.
  """
  predict = make_predict(normalize, flip, shift)

  def eval_step(state: TrainState, batch: Batch) -> dict[str, jax.Array]:
    mask = batch["mask"]
    losses, pred = loss_and_prediction(predict(state, batch["image"]), batch["label"], loss)
    return {"loss": jnp.where(mask, losses, 0.0).sum(),
            "correct": ((pred == batch["label"]) & mask).sum(),
            "count": mask.sum(), "pred": pred, "mask": mask}
  return eval_step


def map_batches(fn: Callable[[Any, Batch], dict[str, Any]], args: Any, data: pipeline.Arrays,
                batch_size: int, mesh: jax.sharding.Mesh) -> Iterator[dict[str, np.ndarray]]:
  """The one batched-inference loop: ``fn``'s outputs on the host, batch after batch.

  Args:
    fn: a jitted ``fn(args, batch) -> out`` (its outputs replicated); ``batch`` holds
      ``image`` ``[B, ...]``, ``label`` ``[B]`` and ``mask`` ``[B]`` (False on padding
      rows), sharded on ``mesh``'s ``data`` axis.
    args: its first argument (a train state, variables), already placed on ``mesh``.
    data: ``(images [N, ...], labels [N])``; every process holds all of it and reads its
      slice of each batch (``parallel.process_shard``).
    batch_size: the global batch; the last batch is padded to it, so one program serves all.
    mesh: the device mesh.
  """
  parallel.check_batch_size(batch_size, mesh, "eval_batch_size")
  sharding = parallel.data_sharding(mesh)
  for batch in pipeline.eval_batches(data, batch_size, parallel.process_shard()):
    yield jax.device_get(fn(args, parallel.to_global(batch, sharding)))


@functools.cache
def _per_example(fn: Callable[[Any, jax.Array], Any], mesh: jax.sharding.Mesh):
  def outputs(args: Any, batch: Batch) -> dict[str, Any]:
    return {"out": fn(args, batch["image"]), "mask": batch["mask"]}
  rep, data = parallel.replicated(mesh), parallel.data_sharding(mesh)
  return jax.jit(outputs, in_shardings=(rep, data), out_shardings=rep)


def apply_batched(fn: Callable[[Any, jax.Array], Any], args: Any, inputs: np.ndarray,
                  batch_size: int, mesh: jax.sharding.Mesh | None = None, desc: str = "") -> Any:
  """``fn(args, x)`` over ``inputs`` ``[N, ...]`` in padded batches: the outputs (a pytree
  of ``[N, ...]`` arrays) as if ``fn`` had seen all ``N`` at once.

  ``fn`` maps a batch ``[B, ...]`` to outputs with leading dimension ``B`` and is compiled
  once per ``(fn, mesh)``; ``args`` (e.g. variables) are replicated over ``mesh`` (default:
  every device). ``desc``: a progress bar with this title (terminals and notebooks).
  """
  mesh = mesh or parallel.make_mesh()
  step = _per_example(fn, mesh)
  args = jax.device_put(args, parallel.replicated(mesh))
  data = (inputs, np.zeros(len(inputs), np.int64))
  parts = []
  for out in progress.bar(map_batches(step, args, data, batch_size, mesh),
                          -(-len(inputs) // batch_size), desc):
    parts.append(jax.tree.map(lambda a, m=out["mask"]: a[m], out["out"]))
  if not parts:
    shapes = jax.eval_shape(fn, args, jax.ShapeDtypeStruct((1, *inputs.shape[1:]), inputs.dtype))
    return jax.tree.map(lambda s: np.zeros((0, *s.shape[1:]), s.dtype), shapes)
  return jax.tree.map(lambda *a: np.concatenate(a), *parts)


def predict_proba(state: TrainState, normalize: Callable[[jax.Array], jax.Array],
                  images: np.ndarray, batch_size: int = 500, loss: str = "cross_entropy",
                  flip: bool = False, shift: int = 0, mesh: jax.sharding.Mesh | None = None,
                  desc: str = "") -> np.ndarray:
  """Class probabilities ``[N, K]`` (``probabilities``) of uint8 images ``[N, H, W, C]``,
  from the logits over the test-time views ``flip`` and ``shift`` (``make_predict``)."""
  return apply_batched(_probabilities(normalize, flip, shift, loss), state, images, batch_size,
                       mesh, desc)


@functools.cache
def _probabilities(normalize, flip, shift, loss):
  predict = make_predict(normalize, flip, shift)
  return lambda state, images: probabilities(predict(state, images), loss)


@dataclasses.dataclass
class Runner:
  """The compiled steps of one run on one mesh."""
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

  def evaluate(self, state: TrainState, data: pipeline.Arrays, batch_size: int,
               desc: str = "") -> dict[str, Any]:
    """Loss, accuracy and predictions ``[N]`` over every example of ``data`` once (each
    process gets all ``N`` predictions)."""
    totals = {"loss": 0.0, "correct": 0, "count": 0}
    preds = []
    batches = map_batches(self.eval_step, state, data, batch_size, self.mesh)
    for out in progress.bar(batches, -(-len(data[1]) // batch_size), desc):
      for k in totals:
        totals[k] += out[k]
      preds.append(out["pred"][out["mask"]])
    count = int(totals["count"])
    return {"loss": float(totals["loss"]) / count, "accuracy": int(totals["correct"]) / count,
            "pred": np.concatenate(preds)}
