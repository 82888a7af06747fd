"""BNCNN: the course's batch-norm CNN for CIFAR-10 (83% after 10 epochs in PyTorch)."""
import functools

import flax.linen as nn
import jax

from cnnjax.models import batch_norm
from cnnjax.models.blocks import pool
from cnnjax.models.conv import Conv
from cnnjax.models.dense import Dense
from cnnjax.models.dropout import Dropout

# torch.nn.BatchNorm defaults: momentum 0.1 (flax 0.9) and eps 1e-5.
BatchNorm = functools.partial(batch_norm.BatchNorm, momentum=0.9, epsilon=1e-5)


class BNCNN(nn.Module):
  """Four blocks of [conv3x3, ReLU, BN, conv3x3, ReLU, BN, maxpool2, dropout], then a
  dense head [512, ReLU, BN, dropout, 1024, ReLU, BN, dropout, classes].

  Input ``[B, H, W, C]`` with H, W >= 16 (32x32 flattens to 2*2*256); returns logits ``[B, num_classes]``.
  """
  num_classes: int = 10
  widths: tuple[int, ...] = (32, 64, 128, 256)
  dense: tuple[int, ...] = (512, 1024)
  conv_dropout: float = 0.25
  dense_dropout: float = 0.5

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    for i, width in enumerate(self.widths):
      for _ in range(2):
        x = Conv(width, (3, 3), padding=((1, 1), (1, 1)), relu=True)(x)
        x = BatchNorm(use_running_average=not train)(x)
      x = pool(x, "max", 2)
      self.sow("intermediates", f"block{i + 1}", x)
      x = Dropout(self.conv_dropout, deterministic=not train)(x)
    x = x.reshape(x.shape[0], -1)
    for width in self.dense:
      x = BatchNorm(use_running_average=not train)(nn.relu(Dense(width)(x)))
      x = Dropout(self.dense_dropout, deterministic=not train)(x)
    return Dense(self.num_classes)(x)
