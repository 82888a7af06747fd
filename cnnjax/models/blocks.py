"""Building blocks shared by the models: pooling (fixed and adaptive) and the course's ConvBlock."""
import functools
from typing import Callable, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

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


def _int_type(dtype: jnp.dtype) -> np.dtype:
  return np.dtype(f"int{jnp.dtype(dtype).itemsize * 8}")


def _bits(x: jax.Array) -> jax.Array:
  """The bit patterns of float ``x`` as signed integers of the same width."""
  return lax.bitcast_convert_type(x, _int_type(x.dtype))


def _flip(bits: jax.Array) -> jax.Array:
  """Flips the magnitude bits of negative patterns: signed integers then order as the floats
  whose bits they are (NaNs aside), and flipping twice gives the bits back."""
  top = bits.dtype.itemsize * 8 - 1
  return bits ^ ((bits >> top) & np.array((1 << top) - 1, bits.dtype))


def _signless_zero(bits: jax.Array) -> jax.Array:
  """-0.0's pattern replaced by +0.0's (they tie, as in a float comparison)."""
  return jnp.where(bits == np.iinfo(bits.dtype).min, np.zeros((), bits.dtype), bits)


def _order_key(bits: jax.Array, dtype: jnp.dtype) -> jax.Array:
  """``_flip`` of the bits of floats of ``dtype``, -0.0 taken as +0.0 and every NaN mapped
  to the largest key (a positive NaN's pattern), so a window holding a NaN pools to NaN."""
  magnitude = np.array(np.iinfo(bits.dtype).max, bits.dtype)
  nan = bits & magnitude > np.array(np.inf, dtype).view(bits.dtype)
  return jnp.where(nan, magnitude, _flip(_signless_zero(bits)))


def _as_keys(x: jax.Array) -> bool:
  """Whether ``max_pool`` compares ``x``'s elements as integer keys: for 16-bit floats, whose
  float maxima XLA:CPU computes by converting every element to float32 and back (2x slower
  in a bfloat16 step); float32 maxima fuse with the activation before them and run faster."""
  return x.dtype.itemsize == 2


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def max_pool(x: jax.Array, window: int) -> jax.Array:
  """``[B, H, W, C]`` -> ``[B, H // window, W // window, C]``: the maximum of each
  non-overlapping window, as elementwise maxima of the window's strided views (of their
  order-preserving integer keys for 16-bit floats: ``_as_keys``)."""
  if not _as_keys(x):
    return functools.reduce(jnp.maximum, _windows(x, window))
  keys = [_order_key(_bits(view), x.dtype) for view in _windows(x, window)]
  return lax.bitcast_convert_type(_flip(functools.reduce(jnp.maximum, keys)), x.dtype)


def _max_pool_fwd(x, window):
  y = max_pool(x, window)
  return y, (x, y)


def _max_pool_bwd(window, residuals, dy):
  """The whole gradient of each window to its first maximum in row-major order (PyTorch's
  rule; ``reduce_max`` would share it among ties), as compares and selects (of integer
  patterns for 16-bit floats)."""
  x, y = residuals
  dy = dy.astype(x.dtype)
  if _as_keys(x):
    y, dy = _bits(y), _bits(dy)
    views = [_signless_zero(_bits(view)) for view in _windows(x, window)]  # y is never -0.0
  else:
    views = _windows(x, window)
  zero = jnp.zeros((), dy.dtype)
  taken, parts = None, []
  for view in views:
    hit = view == y
    hit, taken = (hit, hit) if taken is None else (hit & ~taken, taken | hit)
    parts.append(jnp.where(hit, dy, zero))
  rows = [jnp.stack(parts[i:i + window], axis=3) for i in range(0, window * window, window)]
  b, h, w, c = y.shape
  dx = lax.bitcast_convert_type(jnp.stack(rows, axis=2).reshape(b, h * window, w * window, c),
                                x.dtype)
  return (jnp.pad(dx, ((0, 0), (0, x.shape[1] - h * window), (0, x.shape[2] - w * window),
                       (0, 0))),)


max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)


def pool(x: jax.Array, kind: Literal["max", "avg"], window: int) -> jax.Array:
  """Non-overlapping ``window x window`` pooling with stride ``window`` ('VALID').

  A crop of the remainder rows/columns (what 'VALID' pooling drops), then for 'max' the
  elementwise maximum of the window's strided views (compared as integer keys), differentiated
  by a custom VJP in elementwise passes that gives each window's gradient to its first
  maximum, as PyTorch does (XLA:CPU runs ``reduce_window`` and its gradient 1.8x slower on
  SeedCNN's train step, a reshape + ``max`` reduction and its gradient 2.3-4x slower than
  this in float32, and float maxima 2x slower than integer ones in bfloat16; BENCHMARKS.md),
  for 'avg' a reshape and a mean.

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
    return max_pool(x, window)
  b, h, w, c = x.shape
  h, w = h // window, w // window
  return x[:, :h * window, :w * window].reshape(b, h, window, w, window, c).mean(axis=(2, 4))


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
    x = Conv(self.features, (self.kernel_size, self.kernel_size), padding="SAME")(x)
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
