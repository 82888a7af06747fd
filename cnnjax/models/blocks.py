"""Building blocks shared by the small CNNs: pooling and the course's ConvBlock."""
from typing import Callable, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp

from cnnjax.errors import UserError

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


def pool(x: jax.Array, kind: Literal["max", "avg"], window: int) -> jax.Array:
  """Non-overlapping ``window x window`` pooling with stride ``window`` ('VALID').

  When ``window`` divides H and W this is a reshape and a reduction, which XLA:CPU
  differentiates several times faster than ``reduce_window`` (1.8x on SeedCNN's train
  step, BENCHMARKS.md); otherwise it falls back to flax's pooling, which drops the
  remainder rows/columns exactly like the reshape path would.

  Args:
    x: ``[B, H, W, C]``.
    kind: 'max' or 'avg'.
    window: pooling size rho (and stride).
  Returns:
    ``[B, H // window, W // window, C]``.
  """
  if kind not in ("max", "avg"):
    raise UserError(f"unknown pooling {kind!r}; expected 'max' or 'avg'")
  b, h, w, c = x.shape
  if h % window == 0 and w % window == 0:
    blocks = x.reshape(b, h // window, window, w // window, window, c)
    return blocks.max(axis=(2, 4)) if kind == "max" else blocks.mean(axis=(2, 4))
  shape = (window, window)
  if kind == "max":
    return nn.max_pool(x, shape, strides=shape)
  return nn.avg_pool(x, shape, strides=shape)


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
    x = nn.Conv(self.features, (self.kernel_size, self.kernel_size), padding="SAME")(x)
    x = activation(self.activation)(x)
    return pool(x, self.pooling, self.pool_size)
