"""``BatchNorm``: flax's ``nn.BatchNorm`` (same fields, variables and results) that runs on
oneDNN where that is available, with an ``activation`` after it.

XLA:CPU computes batch statistics and their gradients (reductions over ``[B, H, W]`` per
channel) slowly, and its fusion of the inference-mode normalisation is slower than oneDNN's
on bfloat16 inputs, though not on float32 ones (BENCHMARKS.md notes). So for float32 or
bfloat16 inputs normalised over all axes but the last, on one device and without a mask or
a cross-device ``axis_name``, this module runs on ``cnnjax.onednn``: in training mode
``batch_norm`` (oneDNN's batch normalisation: the statistics in one pass, the normalisation
and its gradient), updating the running averages as flax does, the activation after it in
XLA; in inference mode on bfloat16 inputs ``batch_norm_inference`` with the running
averages, and a ReLU ``activation`` in the same pass. Everything else is ``nn.BatchNorm``'s
own code, then the activation: initialisation; float32 inference; bfloat16 inference
followed by ReLU6, which XLA fuses into one pass with the normalisation; bfloat16 with a
channel count that is not a multiple of 16, where oneDNN has no vectorised kernel and runs
~20x slower than XLA; other dtypes and axes; no oneDNN. Both oneDNN paths have custom VJPs:
forward-mode ``jax.jvp`` through them needs ``runtime.configure(onednn=False)``. Under mixed
precision (``config.precision='bfloat16'``: bfloat16 inputs and parameters) the statistics
stay float32 and the output is bfloat16, as the next layer expects, on both paths. The
variance is the batch's biased variance in both (oneDNN's is computed around the mean,
flax's default as ``E[x^2] - E[x]^2``: equal up to float32 rounding;
``tests/test_onednn.py``).

``conv_norm(conv, norm, x)`` is ``norm(conv(x))``, except in inference mode and in the
frozen base of a transfer learning (``optim.frozen_inference``), where it folds the
normalisation and its activation into the convolution: one convolution, no pass over its
output. ResNet, EfficientNet-Lite and VGG-BN use it; ``cnnjax.interpret`` runs the two
apart (``unfolded``), to see both layers.
"""
import contextlib
import contextvars
from collections.abc import Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp

from cnnjax import onednn, runtime
from cnnjax.errors import UserError

# What may follow the normalisation (``BatchNorm.activation``).
ACTIVATIONS = {None: lambda y: y, "relu": nn.relu, "relu6": nn.relu6}
_FOLDING = contextvars.ContextVar("cnnjax_batch_norm_folding", default=True)
_FROZEN: contextvars.ContextVar[frozenset[tuple[str, ...]]] = contextvars.ContextVar(
    "cnnjax_frozen_batch_norms", default=frozenset())


class BatchNorm(nn.BatchNorm):
  """``nn.BatchNorm`` on oneDNN where it runs (see the module docstring), then
  ``activation``: None, 'relu' or 'relu6' (``nn.relu`` / ``nn.relu6`` of the result; the
  layer's output, e.g. for ``cnnjax.interpret``, is the activation's, as with ``Conv(...,
  relu=True)``).

  Input ``[..., C]``; returns ``[..., C]``."""
  activation: str | None = None

  def _runs_on_onednn(self, x: jax.Array, train: bool, mask: jax.Array | None) -> bool:
    return ((train or (x.dtype == jnp.bfloat16 and self.activation != "relu6"))
            and (x.dtype != jnp.bfloat16 or x.shape[-1] % 16 == 0) and x.size > 0
            and mask is None and self.axis_name is None and not self.is_initializing()
            and self.param_dtype == jnp.float32 and self.dtype in (None, jnp.float32)
            and self.axis in (-1, x.ndim - 1, (-1,)) and runtime.onednn_in_use(x.dtype.name))

  @nn.compact
  def __call__(self, x: jax.Array, use_running_average: bool | None = None, *,
               mask: jax.Array | None = None) -> jax.Array:
    train = not nn.merge_param("use_running_average", self.use_running_average,
                               use_running_average)
    act = ACTIVATIONS.get(self.activation)
    if act is None:
      raise UserError(f"BatchNorm activation {self.activation!r}; expected one of "
                      f"{list(ACTIVATIONS)}")
    if not self._runs_on_onednn(x, train, mask):
      y = act(super().__call__(x, use_running_average, mask=mask))
      return y.astype(jnp.bfloat16) if x.dtype == jnp.bfloat16 else y  # not promoted by the stats
    c = x.shape[-1]
    ra_mean = self.variable("batch_stats", "mean", jnp.zeros, (c,))
    ra_var = self.variable("batch_stats", "var", jnp.ones, (c,))
    scale = (self.param("scale", self.scale_init, (c,), self.param_dtype) if self.use_scale
             else jnp.ones((c,), jnp.float32))
    shift = (self.param("bias", self.bias_init, (c,), self.param_dtype) if self.use_bias
             else jnp.zeros((c,), jnp.float32))
    scale, shift = jnp.asarray(scale, jnp.float32), jnp.asarray(shift, jnp.float32)
    if not train:
      return onednn.batch_norm_inference(x, jnp.asarray(ra_mean.value, jnp.float32),
                                         jnp.asarray(ra_var.value, jnp.float32), scale, shift,
                                         self.epsilon, self.activation == "relu")
    y, mean, var = onednn.batch_norm(x, scale, shift, self.epsilon)
    ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
    ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var
    return act(y)

  def affine(self) -> tuple[jax.Array, jax.Array]:
    """``(a, b)`` ``[C]`` float32 with which the inference-mode normalisation is ``x * a +
    b`` (the running statistics, scale and bias; the parameters must exist)."""
    variables = self.variables
    stats, params = variables["batch_stats"], variables.get("params", {})
    a = jax.lax.rsqrt(stats["var"].astype(jnp.float32) + self.epsilon)
    if self.use_scale:
      a = a * params["scale"].astype(jnp.float32)
    b = params["bias"].astype(jnp.float32) if self.use_bias else 0.0
    return a, b - stats["mean"].astype(jnp.float32) * a


def conv_norm(conv: nn.Module, norm: BatchNorm, x: jax.Array) -> jax.Array:
  """``norm(conv(x))`` for a ``cnnjax.models.conv.Conv`` (or ``DepthwiseConv``) and a
  ``BatchNorm`` made in the calling module's compact method. In inference mode
  (``norm.use_running_average=True``, or frozen: ``inference_under``), once the parameters
  exist, the normalisation is folded into the convolution: one convolution with the kernel
  times ``a`` and the bias times ``a`` plus ``b`` (``BatchNorm.affine``), the activation
  inside oneDNN's kernel where it runs there, instead of a convolution, then a pass over its
  output (EfficientNet-Lite0 and bfloat16 ResNet-18 inference: BENCHMARKS.md). Equal up to
  float rounding. Within ``unfolded()`` both modules run, so that ``cnnjax.interpret`` sees
  each one's output (as must anything else that captures modules' outputs, e.g. flax's
  ``capture_intermediates``).

  ``x [B, H, W, Cin]``; returns ``[B, Ho, Wo, Cout]``."""
  inference = (norm.use_running_average is True
               or is_under((*norm.parent.path, norm.name), _FROZEN.get()))
  if (_FOLDING.get() and inference and norm.axis in (-1, (-1,)) and norm.dtype is None
      and norm.activation in ACTIVATIONS and conv._folds(x)  # pylint: disable=protected-access
      and not norm.parent.is_initializing()):
    return conv.fold(x, *norm.affine(), norm.activation)
  return norm(conv(x))


def is_under(path: tuple[str, ...], paths: frozenset[tuple[str, ...]]) -> bool:
  """Whether the module at ``path`` is one of ``paths`` or inside one."""
  return any(path[:i] in paths for i in range(1, len(path) + 1))


@contextlib.contextmanager
def inference_under(paths: frozenset[tuple[str, ...]]) -> Iterator[None]:
  """Within the block ``conv_norm`` folds the batch norms at or inside ``paths`` (module
  paths) as in inference mode, whatever their ``use_running_average``: the frozen modules
  of ``optim.frozen_inference``, which runs their ``__call__`` in inference mode."""
  token = _FROZEN.set(paths)
  try:
    yield
  finally:
    _FROZEN.reset(token)


@contextlib.contextmanager
def unfolded() -> Iterator[None]:
  """Within the block ``conv_norm`` runs the convolution and the normalisation apart."""
  token = _FOLDING.set(False)
  try:
    yield
  finally:
    _FOLDING.reset(token)

