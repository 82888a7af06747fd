"""LeNet-5: modern (ReLU + max pooling) by default, the 1998 original (sigmoid + average)."""
from typing import Literal

import flax.linen as nn
import jax

from cnnjax.models.blocks import activation, pool
from cnnjax.models.conv import Conv
from cnnjax.models.dense import Dense


class LeNet(nn.Module):
  """conv5x5 6 (pad ``padding``) -> pool -> conv5x5 16 (valid) -> pool -> dense 120 -> 84 ->
  classes.

  ``[B, 28, 28, 1]`` flattens to 16*5*5 = 400 features with ``padding=2`` (LeCun's 32x32
  input), to 16*4*4 = 256 with ``padding=0`` (the Fashion-MNIST notebook's); ``[B, 32, 32,
  3]`` to 576 with 2. Returns logits ``[B, num_classes]``.
  """
  num_classes: int = 10
  activation: str = "relu"
  pooling: Literal["max", "avg"] = "max"
  padding: int = 2

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    del train  # no dropout or batch norm
    act = activation(self.activation)
    relu = self.activation == "relu"  # then inside the convolutions
    x = Conv(6, (5, 5), padding=((self.padding,) * 2,) * 2, relu=relu)(x)
    x = pool(x if relu else act(x), self.pooling, 2)
    x = Conv(16, (5, 5), padding="VALID", relu=relu)(x)
    x = pool(x if relu else act(x), self.pooling, 2)
    x = x.reshape(x.shape[0], -1)
    self.sow("intermediates", "features", x)
    x = act(Dense(120)(x))
    x = act(Dense(84)(x))
    return Dense(self.num_classes)(x)
