"""Building blocks shared by the models: pooling (fixed and adaptive) and the course's ConvBlock."""
import functools
from typing import Callable, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from cnnjax import onednn, runtime
from cnnjax.errors import UserError
from cnnjax.models.conv import Conv

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": nn.relu,
    "sigmoid": nn.sigmoid,
    "tanh": jnp.tanh,
    "gelu": nn.gelu,
    "elu": nn.elu,
}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
  """Returns the activation function called ``name`` (see ``ACTIVATIONS``)."""
  if name not in ACTIVATIONS:
    raise UserError(f"unknown activation {name!r}; expected one of {sorted(ACTIVATIONS)}")
  return ACTIVATIONS[name]


def _windows(x: jax.Array, window: int) -> list[jax.Array]:
  """The ``window * window`` strided views ``[B, H // window, W // window, C]`` of ``x [B, H,
  W, C]`` (cropped to multiples of ``window``), one per position in the window, row-major."""
  b, h, w, c = x.shape
  h, w = h // window, w // window
  blocks = x[:, :h * window, :w * window].reshape(b, h, window, w, window, c)
  return [blocks[:, :, i, :, j] for i in range(window) for j in range(window)]


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def max_pool(x: jax.Array, window: int) -> jax.Array:
  """``[B, H, W, C]`` -> ``[B, H // window, W // window, C]``: the maximum of each
  non-overlapping window, as elementwise maxima of the window's strided views."""
  return functools.reduce(jnp.maximum, _windows(x, window))


def _max_pool_fwd(x, window):
  y = max_pool(x, window)
  return y, (x, y)


def _max_pool_bwd(window, residuals, dy):
  """``reduce_max``'s gradient (ties share it equally), as elementwise passes."""
  x, y = residuals
  hits = [view == y for view in _windows(x, window)]
  share = dy / functools.reduce(jnp.add, [hit.astype(dy.dtype) for hit in hits])
  rows = [jnp.stack([jnp.where(hit, share, 0) for hit in hits[i:i + window]], axis=3)
          for i in range(0, window * window, window)]
  b, h, w, c = y.shape
  dx = jnp.stack(rows, axis=2).reshape(b, h * window, w * window, c)
  return (jnp.pad(dx, ((0, 0), (0, x.shape[1] - h * window), (0, x.shape[2] - w * window),
                       (0, 0))),)


max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)


def pool(x: jax.Array, kind: Literal["max", "avg"], window: int) -> jax.Array:
  """Non-overlapping ``window x window`` pooling with stride ``window`` ('VALID').

  A crop of the remainder rows/columns (what 'VALID' pooling drops), then for 'max' the
  elementwise maximum of the window's strided views, differentiated by a custom VJP in
  elementwise passes (XLA:CPU runs ``reduce_window`` and its gradient 1.8x slower on
  SeedCNN's train step, a reshape + ``max`` reduction and its gradient 2.3-4x slower than
  this; BENCHMARKS.md), or the same computed by ``cnnjax.onednn.max_pool`` where
  ``runtime.onednn_in_use``; for 'avg' a reshape and a mean.

  Args:
    x: ``[B, H, W, C]``.
    kind: 'max' or 'avg'.
    window: pooling size rho (and stride).
  Returns:
    ``[B, H // window, W // window, C]``.
  """
  if kind not in ("max", "avg"):
    raise UserError(f"unknown pooling {kind!r}; expected 'max' or 'avg'")
  if kind == "max":
    if runtime.onednn_in_use(x.dtype.name):
      return onednn.max_pool(x, window)  # the same values and gradient, in one pass each way
    return max_pool(x, window)
  b, h, w, c = x.shape
  h, w = h // window, w // window
  return x[:, :h * window, :w * window].reshape(b, h, window, w, window, c).mean(axis=(2, 4))


def window_max_pool(x: jax.Array, window: int, stride: int,
                    padding: str | tuple[tuple[int, int], tuple[int, int]]) -> jax.Array:
  """``nn.max_pool(x, (window, window), (stride, stride), padding)`` (windows may overlap,
  padding counts as -inf; pairs or 'SAME'/'VALID'), ``[B, H, W, C]`` -> ``[B, Ho, Wo, C]``:
  the same values and gradient (bfloat16's overlaps summed in float32) computed by
  ``cnnjax.onednn.window_max_pool`` where ``runtime.onednn_in_use`` (XLA:CPU runs it in
  bfloat16 several times slower than in float32; BENCHMARKS.md notes)."""
  if isinstance(padding, str):
    padding = lax.padtype_to_pads(x.shape[1:3], (window, window), (stride, stride), padding)
  padding = tuple(tuple(p) for p in padding)
  if runtime.onednn_in_use(x.dtype.name):
    return onednn.window_max_pool(x, window, stride, padding)
  return nn.max_pool(x, (window, window), strides=(stride, stride), padding=padding)


class ConvBlock(nn.Module):
  """The seed course's block: conv k x k ('same') -> activation -> pooling rho x rho.

  Input ``[B, H, W, Cin]``, output ``[B, H // rho, W // rho, features]``.
  """
  features: int
  kernel_size: int = 3
  activation: str = "relu"
  pooling: Literal["max", "avg"] = "max"
  pool_size: int = 2

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    relu = self.activation == "relu"  # then inside the convolution
    x = Conv(self.features, (self.kernel_size, self.kernel_size), padding="SAME", relu=relu)(x)
    if not relu:
      x = activation(self.activation)(x)
    return pool(x, self.pooling, self.pool_size)


def _adaptive_pool_matrix(n_in: int, n_out: int) -> np.ndarray:
  """``[n_out, n_in]`` averaging weights: output ``i`` averages inputs
  ``floor(i * n_in / n_out)`` .. ``ceil((i + 1) * n_in / n_out) - 1`` (torch's bins)."""
  matrix = np.zeros((n_out, n_in), np.float32)
  for i in range(n_out):
    start, end = (i * n_in) // n_out, -(-(i + 1) * n_in // n_out)
    matrix[i, start:end] = 1.0 / (end - start)
  return matrix


def adaptive_avg_pool(x: jax.Array, size: int) -> jax.Array:
  """torch's ``AdaptiveAvgPool2d((size, size))``: ``[B, H, W, C]`` -> ``[B, size, size, C]``.

  Bins may overlap (H = 2, size = 7) or repeat one input (H = 1); for H = size it is the
  identity. Computed as two small matrix products with the bins' averaging weights.
  """
  rows = _adaptive_pool_matrix(x.shape[1], size)
  cols = _adaptive_pool_matrix(x.shape[2], size)
  return jnp.einsum("yh,bhwc,xw->byxc", rows, x, cols)
