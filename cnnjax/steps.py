"""The compiled pieces of a run: train state, the one init, losses, normalisation, train and
eval steps, test-time views, and the one batched-inference loop (``map_batches`` /
``apply_batched``) that evaluation, predict, feature extraction, report and zero-shot use.
"""
import dataclasses
import functools
from collections.abc import Callable, Iterator
from typing import Any

import chex
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util
from flax.training import train_state

from cnnjax import config as config_lib
from cnnjax import optim, parallel, progress, runtime
from cnnjax.data import pipeline
from cnnjax.errors import UserError

Batch = dict[str, jax.Array]
LOSSES = ("cross_entropy", "binary_cross_entropy")


class TrainState(train_state.TrainState):
  """params, opt_state and step (from flax), plus batch-norm statistics, the rng from which
  each step's dropout key is folded (raw uint32 key, so orbax can save it) and ``ema``: the
  exponential moving average of the variables (``{'params': ..., 'batch_stats': ...}``, as
  ``model_variables``) that evaluation uses when ``config.ema`` > 0, else ``{}``."""
  batch_stats: Any
  rng: jax.Array
  ema: Any = flax.struct.field(default_factory=dict)


def run_once(fn: Callable[..., Any], *args) -> Any:
  """``fn(*args)`` jitted, for what runs once (initialisation): compiled at LLVM -O0, or
  traced inside a trace (under ``jit`` or ``eval_shape``).

  One compiled call instead of eager operations that each compile on their own; -O3 took
  3-7 s of a run's start-up on CPU (-O0: 0.4-2 s). The values agree with -O3's to an ulp or
  so (FMA contraction in the truncated-normal sampler)."""
  jitted = jax.jit(fn)
  if isinstance(jnp.asarray(0), jax.core.Tracer):  # inside a trace every new value is a tracer
    return jitted(*args)
  return jitted.lower(*args).compile({"xla_backend_optimization_level": "0"})(*args)


def init_variables(model: nn.Module, input_shape: tuple[int, ...],
                   rng: jax.Array) -> dict[str, Any]:
  """``model.init`` on zeros of ``input_shape`` ``[B, H, W, C]`` in inference mode
  (``run_once``); a shape the model cannot take is a UserError naming it."""
  dummy = jnp.zeros(input_shape, jnp.float32)
  try:
    return run_once(lambda r: model.init(r, dummy, train=False), rng)
  except (TypeError, ValueError, ZeroDivisionError) as e:  # shape errors: input does not fit
    first = str(e).strip().splitlines()[0][:200]
    raise UserError(f"images of shape {tuple(input_shape[1:])} do not fit model "
                    f"{type(model).__name__} ({first})") from e


def init_opt_state(tx: optax.GradientTransformation, params: Any) -> Any:
  """``tx.init(params)`` (``run_once``)."""
  return run_once(tx.init, params)


def torch_init(params: Any, seed: int | jax.Array) -> Any:
  """``params`` with every kernel (a parameter named 'kernel' of rank >= 2: Dense ``[in,
  out]``, Conv ``[kh, kw, in / groups, out]``) and its layer's bias redrawn as PyTorch's
  ``Conv2d``/``Linear.reset_parameters`` draw them: U(-b, b), b = 1 / sqrt(fan_in), fan_in
  = the product of the kernel's dimensions but the last; other parameters (batch-norm scales
  and offsets, ...) unchanged. One compiled call (``run_once``), or traced inside
  ``create_train_state``'s; seeded by ``seed`` (an int, or traced)."""
  flat = traverse_util.flatten_dict(params)
  fans = {path[:-1]: int(np.prod(v.shape[:-1])) for path, v in flat.items()
          if path[-1] == "kernel" and np.ndim(v) >= 2}
  paths = sorted(path for path in flat if path[:-1] in fans and path[-1] in ("kernel", "bias"))

  def draw(seed: jax.Array) -> list[jax.Array]:
    key = jax.random.fold_in(jax.random.PRNGKey(seed), 1)  # apart from the model's own init key
    bounds = [1 / np.sqrt(fans[path[:-1]]) for path in paths]
    return [jax.random.uniform(jax.random.fold_in(key, i), flat[path].shape, flat[path].dtype,
                               -bound, bound) for i, (path, bound) in enumerate(zip(paths, bounds))]
  flat.update(zip(paths, run_once(draw, seed if isinstance(seed, jax.Array) else np.int32(seed))))
  return traverse_util.unflatten_dict(flat)


def create_train_state(model: nn.Module, tx: optax.GradientTransformation,
                       image_shape: tuple[int, ...], seed: int, init: str = "flax") -> TrainState:
  """Initialises ``model`` for images ``[H, W, C]`` and wraps it with optimizer ``tx``: one
  compiled call (``run_once``) makes the keys, variables and optimizer state. ``seed`` in
  ``[0, 2**31)``; ``init``: 'flax' (the layers' own initialisers) or 'torch' (then
  ``torch_init``, in the same call)."""
  if init not in config_lib.INITS:
    raise UserError(f"init={init!r}; expected one of {list(config_lib.INITS)}")

  def init_all(seed: jax.Array) -> tuple[dict[str, Any], Any, jax.Array]:
    init_rng, rng = jax.random.split(jax.random.PRNGKey(seed))
    variables = init_variables(model, (1, *image_shape), init_rng)
    if init == "torch":
      variables = {**variables, "params": torch_init(variables["params"], seed)}
    return variables, tx.init(variables["params"]), rng
  variables, opt_state, rng = run_once(init_all, np.int32(seed))
  return TrainState(step=0, apply_fn=model.apply, params=variables["params"], tx=tx,
                    opt_state=opt_state, batch_stats=variables.get("batch_stats", {}), rng=rng)


def model_variables(state: TrainState, params: Any = None) -> dict[str, Any]:
  """``{'params': ..., 'batch_stats': ...}`` for ``model.apply``: with ``params`` given, those
  and ``state``'s statistics (training); else the weights evaluation uses, the moving
  average ``state.ema`` where the run keeps one, ``state``'s own otherwise."""
  if params is None and state.ema:
    return state.ema
  params = state.params if params is None else params
  return {"params": params, "batch_stats": state.batch_stats} if state.batch_stats else {"params": params}


def with_ema(state: TrainState) -> TrainState:
  """``state`` starting a moving average of its variables (a copy of them)."""
  return state.replace(ema=jax.tree.map(jnp.copy, model_variables(state, state.params)))


def ema_decay(decay: float, step: jax.Array) -> jax.Array:
  """The averaging weight at optimizer step ``step``: ``decay``, lower early on
  (``(1 + step) / (10 + step)``, as tf.train.ExponentialMovingAverage's num_updates) so the
  average is not dominated by the random initial weights."""
  return jnp.minimum(decay, (1.0 + step) / (10.0 + step))


def move_average(average: Any, variables: Any, decay: jax.Array | float) -> Any:
  """``average`` moved towards ``variables`` (trees of the same structure), keeping ``decay``
  of itself."""
  return jax.tree.map(lambda a, v: a + (1.0 - decay) * (v - a), average, variables)


def lookahead_update(average: Any, variables: Any, step: jax.Array, decay: float, period: int,
                     total_steps: int) -> tuple[Any, Any]:
  """airbench94's Lookahead-EMA after optimizer step ``step`` (counted from 1): every
  ``period`` steps the average moves towards ``variables`` with weight ``decay ** period *
  (step / total_steps) ** 3`` on the old average (little averaging early, more as training
  ends) and training restarts from it. Returns ``(average, variables)``, both as
  ``model_variables``."""
  sync = step % period == 0
  weight = jnp.where(sync, decay ** period * jnp.minimum(step / total_steps, 1.0) ** 3, 1.0)
  average = move_average(average, variables, weight)  # weight 1 off the period: unchanged
  return average, jax.tree.map(lambda a, v: jnp.where(sync, a, v), average, variables)


def cast_floats(tree: Any, dtype: str) -> Any:
  """The floating-point leaves of ``tree`` in ``dtype`` (mixed precision's compute copy)."""
  return jax.tree.map(lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a,
                      tree)


def apply_in(dtype: str, apply_fn: Callable[..., Any], variables: dict[str, Any],
             images: jax.Array, **kwargs) -> Any:
  """``apply_fn(variables, images, **kwargs)`` computing in ``dtype``: parameters and images
  cast to it (batch-norm statistics stay float32), float32 logits returned (with the
  ``mutable`` collections' updates, if any, unchanged)."""
  if dtype != "float32":
    variables = {**variables, "params": cast_floats(variables["params"], dtype)}
    images = images.astype(dtype)
  out = apply_fn(variables, images, **kwargs)
  if isinstance(out, tuple):
    return out[0].astype(jnp.float32), out[1]
  return out.astype(jnp.float32)


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
                    frozen: frozenset[tuple[str, ...]] = frozenset(), dtype: str = "float32",
                    ema: float = 0.0, lookahead: int = 0, total_steps: int = 0):
  """``train_step(state, batch) -> (state, sums)``: one optimizer step on a batch.

  ``sums`` holds ``loss`` (summed over the batch), ``correct`` and ``count``, so epochs
  accumulate exact means. Dropout uses ``fold_in(state.rng, state.step)``; batch norm
  runs in train mode and its new statistics replace the old, except in the ``frozen``
  modules (``optim.frozen_modules``), which run in inference mode and keep theirs
  (``optim.frozen_inference``). ``loss``: one of LOSSES. ``dtype``: the compute dtype
  (``apply_in``); gradients and the update are float32. ``ema`` > 0: ``state.ema`` moves
  towards the new variables with weight ``ema_decay(ema, step)``; with ``lookahead`` > 0
  instead every ``lookahead`` steps, and training restarts from it (``lookahead_update``;
  its ramp needs the run's ``total_steps``).
  """
  if lookahead and (not ema or total_steps < 1):
    raise ValueError(f"lookahead={lookahead} needs ema > 0 and total_steps >= 1, got "
                     f"ema={ema}, total_steps={total_steps}")
  def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
    images, labels = normalize(batch["image"]), batch["label"]
    chex.assert_rank(images, 4)
    dropout_rng = jax.random.fold_in(state.rng, state.step)

    def loss_fn(params):
      with optim.frozen_inference(frozen):
        logits, updates = apply_in(dtype, state.apply_fn, model_variables(state, params), images,
                                   train=True, rngs={"dropout": dropout_rng},
                                   mutable=["batch_stats"])
      losses, pred = loss_and_prediction(logits, labels, loss, label_smoothing)
      return losses.mean(), (losses, pred, updates)

    grads, (losses, pred, updates) = jax.grad(loss_fn, has_aux=True)(state.params)
    batch_stats = jax.tree.map(lambda new, old: new.astype(old.dtype),
                               updates.get("batch_stats", state.batch_stats), state.batch_stats)
    new = state.apply_gradients(grads=grads, batch_stats=batch_stats)
    if lookahead:
      average, live = lookahead_update(state.ema, model_variables(new, new.params), new.step,
                                       ema, lookahead, total_steps)
      new = new.replace(ema=average, params=live["params"],
                        batch_stats=live.get("batch_stats", new.batch_stats))
    elif ema:
      new = new.replace(ema=move_average(state.ema, model_variables(new, new.params),
                                         ema_decay(ema, state.step)))
    state = new
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
                 shift: int = 0, dtype: str = "float32"
                 ) -> Callable[[TrainState, jax.Array], jax.Array]:
  """``logits(state, images)``: float32 logits ``[B, K]`` of uint8 images ``[B, H, W, C]``
  computed in ``dtype`` (``apply_in``) with the evaluation weights (``model_variables``),
  batch norm in inference mode, averaged over the test-time views (``test_time_logits``)."""
  def logits(state: TrainState, images: jax.Array) -> jax.Array:
    def logits_of(x: jax.Array) -> jax.Array:
      return apply_in(dtype, state.apply_fn, model_variables(state), normalize(x), train=False)
    return test_time_logits(logits_of, images, flip, shift)
  return logits


def make_eval_step(normalize: Callable[[jax.Array], jax.Array], loss: str = "cross_entropy",
                   flip: bool = False, shift: int = 0, dtype: str = "float32"):
  """``eval_step(state, batch) -> out``: batch norm in inference mode, padding masked.

  ``out`` holds ``loss``/``correct``/``count`` sums over real examples, ``pred`` ``[B]``
  (predicted class, see ``loss_and_prediction``) and ``mask`` ``[B]`` (False on padding rows).
  ``flip``, ``shift``: test-time augmentation, see ``test_time_logits``; ``dtype``: the
  compute dtype.
  """
  predict = make_predict(normalize, flip, shift, dtype)

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
                  desc: str = "", dtype: str = "float32") -> np.ndarray:
  """Class probabilities ``[N, K]`` (``probabilities``) of uint8 images ``[N, H, W, C]``,
  from the logits over the test-time views ``flip`` and ``shift`` (``make_predict``),
  computed in ``dtype``."""
  return apply_batched(_probabilities(normalize, flip, shift, loss, dtype), state, images,
                       batch_size, mesh, desc)


@functools.cache
def _probabilities(normalize, flip, shift, loss, dtype):
  predict = make_predict(normalize, flip, shift, dtype)
  return lambda state, images: probabilities(predict(state, images), loss)


@dataclasses.dataclass
class Runner:
  """The compiled steps of one run on one mesh, computing in ``dtype``."""
  train_step: Callable[..., Any]
  eval_step: Callable[..., Any]
  mesh: jax.sharding.Mesh
  dtype: str = "float32"

  @classmethod
  def create(cls, normalize: Callable[[jax.Array], jax.Array], label_smoothing: float = 0.0,
             mesh: jax.sharding.Mesh | None = None, loss: str = "cross_entropy",
             frozen: frozenset[tuple[str, ...]] = frozenset(),
             eval_flip: bool = False, eval_shift: int = 0, dtype: str = "float32",
             ema: float = 0.0, lookahead: int = 0, total_steps: int = 0) -> "Runner":
    """Compiles the steps of ``make_train_step``/``make_eval_step`` (``flip=eval_flip``,
    ``shift=eval_shift``) for ``mesh``."""
    if loss not in LOSSES:
      raise UserError(f"unknown loss {loss!r}; expected one of {list(LOSSES)}")
    mesh = mesh or parallel.make_mesh()
    rep, data = parallel.replicated(mesh), parallel.data_sharding(mesh)
    train_step = jax.jit(make_train_step(normalize, label_smoothing, loss, frozen, dtype, ema,
                                         lookahead, total_steps),
                         in_shardings=(rep, data), out_shardings=(rep, rep), donate_argnums=0)
    eval_step = jax.jit(make_eval_step(normalize, loss, eval_flip, eval_shift, dtype),
                        in_shardings=(rep, data), out_shardings=rep)
    return cls(train_step, eval_step, mesh, dtype)

  @classmethod
  def for_config(cls, config: Any, normalize: Callable[[jax.Array], jax.Array],
                 mesh: jax.sharding.Mesh, frozen: frozenset[tuple[str, ...]],
                 total_steps: int = 0) -> "Runner":
    """``create`` with a run config's loss, label smoothing, test-time views, precision
    (``runtime.compute_dtype``) and weight averaging (``total_steps``: the run's, for
    ``config.lookahead``)."""
    dtype, _ = runtime.compute_dtype(config.precision)
    return cls.create(normalize, config.label_smoothing, mesh, config.loss, frozen,
                      config.eval_flip, config.eval_shift, dtype, config.ema, config.lookahead,
                      total_steps)

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
