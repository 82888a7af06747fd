"""``Dropout``: flax's ``nn.Dropout`` (same fields and rng) drawing its mask from 8 or 16
random bits per element instead of a float32 uniform, and applying it as a product.

``jax.random.bernoulli`` hashes one 32-bit threefry word per element, which XLA:CPU runs
as a rolled loop, and flax's ``select`` of ``x / keep`` adds a division per element: BNCNN's
six dropout layers cost ~10% of its float32 train step (BENCHMARKS.md notes). Here one word
gives four bytes (two half-words), each compared with an integer threshold, and the mask is
applied as ``x * (mask * (1 / keep))`` in ``x``'s dtype. The keep probability is
``threshold / 256`` when ``256 * (1 - rate)`` is a whole number (rates 0.25, 0.5, ...), else
``threshold / 65536``; kept inputs are scaled by its inverse, rounded to ``x``'s dtype (in
bfloat16 at most 2^-9 off: 1/0.75 is 1.336).
"""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax


def keep_mask(rng: jax.Array, keep: float, shape: tuple[int, ...]) -> tuple[jax.Array, float]:
  """A boolean mask of ``shape``, each entry True with probability ``keep`` in (0, 1)
  quantised to 8 or 16 bits (see the module docstring), and that probability."""
  bits = 8 if float(keep * 256).is_integer() else 16
  levels = 1 << bits
  threshold = round(keep * levels)
  n = math.prod(shape)
  words = jax.random.bits(rng, (-(-n * bits // 32),), jnp.uint32)
  parts = lax.bitcast_convert_type(words, jnp.uint8 if bits == 8 else jnp.uint16)
  mask = parts.reshape(-1)[:n].reshape(shape) < jnp.asarray(threshold, jnp.uint32)
  return mask, threshold / levels


class Dropout(nn.Dropout):
  """``nn.Dropout`` with a mask from ``keep_mask``. Input ``[...]``; returns the same shape,
  dropped entries zero and kept ones scaled by the inverse keep probability while training."""

  @nn.compact
  def __call__(self, inputs: jax.Array, deterministic: bool | None = None,
               rng: jax.Array | None = None) -> jax.Array:
    deterministic = nn.merge_param("deterministic", self.deterministic, deterministic)
    if self.rate == 0.0 or deterministic:
      return inputs
    shape = list(inputs.shape)
    for dim in self.broadcast_dims:
      shape[dim] = 1
    keep = 1.0 - self.rate
    if round(keep * 65536) == 0:  # rate 1 (or within 2^-17 of it): nothing is kept
      return jnp.zeros_like(inputs)
    mask, keep = keep_mask(self.make_rng(self.rng_collection) if rng is None else rng,
                           keep, tuple(shape))
    return inputs * (mask.astype(inputs.dtype) * jnp.asarray(1 / keep, inputs.dtype))
