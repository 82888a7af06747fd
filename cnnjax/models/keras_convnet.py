"""The Keras book's MNIST convnet."""
import flax.linen as nn
import jax

from cnnjax.models.blocks import pool
from cnnjax.models.conv import Conv


class KerasConvNet(nn.Module):
  """conv3x3 32 ReLU, maxpool, conv3x3 64 ReLU, maxpool, conv3x3 64 ReLU (all 'valid'),
  flatten, dense 64 ReLU, dense classes.

  ``[B, 28, 28, 1]`` flattens to 3*3*64 = 576 features; returns ``[B, num_classes]``.
  """
  num_classes: int = 10

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    del train
    x = pool(nn.relu(Conv(32, (3, 3), padding="VALID")(x)), "max", 2)
    x = pool(nn.relu(Conv(64, (3, 3), padding="VALID")(x)), "max", 2)
    x = nn.relu(Conv(64, (3, 3), padding="VALID")(x))
    x = x.reshape(x.shape[0], -1)
    self.sow("intermediates", "features", x)
    x = nn.relu(nn.Dense(64)(x))
    return nn.Dense(self.num_classes)(x)
