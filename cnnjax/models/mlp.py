"""The fully connected baseline the course compares CNNs against."""
import flax.linen as nn
import jax

from cnnjax.models.dense import Dense
from cnnjax.models.dropout import Dropout


class MLP(nn.Module):
  """flatten -> [dense hidden, ReLU]* -> dense classes. ``[B, ...]`` -> ``[B, num_classes]``."""
  num_classes: int = 10
  hidden: tuple[int, ...] = (128,)
  dropout: float = 0.0

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    x = x.reshape(x.shape[0], -1)
    for width in self.hidden:
      x = nn.relu(Dense(width)(x))
      x = Dropout(self.dropout, deterministic=not train)(x)
    return Dense(self.num_classes)(x)
