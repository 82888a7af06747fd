"""Plain conv stacks, as the course notebooks write them: 3x3 convs with ReLU, max pooling
after some of them, flatten (or global average pooling), dropout, dense layers.

``PlainCNN`` is the one implementation; each notebook's network is a subclass that only sets
its defaults, so a config can also vary any of them (``--config.model.widths='(16, 32)'``).
"""
import flax.linen as nn
import jax

from cnnjax.models.blocks import pool
from cnnjax.models.conv import Conv
from cnnjax.models.dense import Dense
from cnnjax.models.dropout import Dropout


class PlainCNN(nn.Module):
  """[conv3x3 width, ReLU, (max pool 2 if its index is in ``pool_after``)] per width ->
  flatten (``global_pool``: mean over H, W) -> dropout -> [dense, ReLU] per ``hidden`` ->
  dense ``num_classes``. ``[B, H, W, C]`` -> logits ``[B, num_classes]``.

  ``padding``: ``'SAME'`` (PyTorch's ``padding=1``) or ``'VALID'`` (Keras' default).
  """
  num_classes: int = 10
  widths: tuple[int, ...] = (32, 64)
  pool_after: tuple[int, ...] = (0, 1)
  padding: str = "SAME"
  global_pool: bool = False
  dropout: float = 0.0
  hidden: tuple[int, ...] = ()

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    for i, width in enumerate(self.widths):
      x = Conv(width, (3, 3), padding=self.padding, relu=True)(x)
      if i in self.pool_after:
        x = pool(x, "max", 2)
    x = x.mean(axis=(1, 2)) if self.global_pool else x.reshape(x.shape[0], -1)
    self.sow("intermediates", "features", x)
    x = Dropout(self.dropout, deterministic=not train)(x)
    for width in self.hidden:
      x = nn.relu(Dense(width)(x))
    return Dense(self.num_classes)(x)


class SimpleCNN(PlainCNN):
  """The PyTorch CIFAR-10 notebook's SimpleCNN: conv 10, conv 10 (padding 1), max pool,
  flatten (``[B, 32, 32, 3]``: 10x16x16 = 2560 features), dense classes."""
  widths: tuple[int, ...] = (10, 10)
  pool_after: tuple[int, ...] = (1,)


class KerasConvNet(PlainCNN):
  """The Keras book's MNIST convnet: conv 32, pool, conv 64, pool, conv 64 ('valid'),
  flatten (``[B, 28, 28, 1]``: 3x3x64 = 576), dense 64, dense classes."""
  widths: tuple[int, ...] = (32, 64, 64)
  pool_after: tuple[int, ...] = (0, 1)
  padding: str = "VALID"
  hidden: tuple[int, ...] = (64,)


class KerasCatsDogs(PlainCNN):
  """The Keras book's cats-vs-dogs convnet from scratch: conv 32, 64, 128, 128 ('valid'),
  each followed by max pooling (``[B, 150, 150, 3]``: 7x7x128 = 6272), dropout 0.5,
  dense 512, and one output (a sigmoid's logit: ``loss='binary_cross_entropy'``)."""
  num_classes: int = 1
  widths: tuple[int, ...] = (32, 64, 128, 128)
  pool_after: tuple[int, ...] = (0, 1, 2, 3)
  padding: str = "VALID"
  dropout: float = 0.5
  hidden: tuple[int, ...] = (512,)


class TinyImageNetCNN(PlainCNN):
  """The R torch book's Tiny ImageNet convnet: conv 64, 128, 256, 512 (padding 1), each
  followed by max pooling, conv 1024, global average pooling, dense 1024, 1024, classes."""
  num_classes: int = 200
  widths: tuple[int, ...] = (64, 128, 256, 512, 1024)
  pool_after: tuple[int, ...] = (0, 1, 2, 3)
  global_pool: bool = True
  hidden: tuple[int, ...] = (1024, 1024)
