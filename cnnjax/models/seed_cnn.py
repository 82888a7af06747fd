"""SeedCNN: the seed course's first CIFAR-10 network."""
import flax.linen as nn
import jax

from cnnjax.models.blocks import ConvBlock
from cnnjax.models.dense import Dense
from cnnjax.models.dropout import Dropout


class SeedCNN(nn.Module):
  """ConvBlock 3->8, ConvBlock 8->16, flatten, dropout, dense 16, ReLU, dense classes.

  ``[B, 32, 32, 3]`` flattens to 1024 features; other input sizes work unchanged
  (``[B, 28, 28, 1]`` flattens to 784). Returns logits ``[B, num_classes]``.
  """
  num_classes: int = 10
  widths: tuple[int, ...] = (8, 16)
  kernel_size: int = 3
  hidden: int = 16
  dropout: float = 0.5

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    for width in self.widths:
      x = ConvBlock(width, self.kernel_size)(x)
    x = x.reshape(x.shape[0], -1)
    self.sow("intermediates", "features", x)
    x = Dropout(self.dropout, deterministic=not train)(x)
    x = nn.relu(Dense(self.hidden)(x))
    return Dense(self.num_classes)(x)
