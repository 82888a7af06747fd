"""AirbenchNet: the network of Keller Jordan's airbench94 (94% CIFAR-10 in 3.8 A100-seconds,
arXiv:2404.00498), in flax.

A 2x2 'whitening' convolution (3 -> 24 channels, VALID) whose kernel is computed from the
training images (``data_init``) and kept frozen, GELU, then three groups of [conv3x3,
maxpool2, BN, GELU, conv3x3, BN, GELU] of widths 64/256/256, a global max pool, and a
bias-free dense layer whose logits are scaled by 1/9. Convolutions have no bias and start
with the identity (dirac) on their first input-many output channels; batch norms have no
scale (only an offset), eps 1e-12 and running statistics kept as 0.6 old + 0.4 new (airbench's
``momentum=0.6``, which it passes to torch as ``1 - 0.6``; flax's ``momentum`` is the old share).
"""
import functools
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cnnjax.models import batch_norm
from cnnjax.models.blocks import pool
from cnnjax.models.conv import Conv
from cnnjax.models.dense import Dense

BatchNorm = functools.partial(batch_norm.BatchNorm, momentum=0.6, epsilon=1e-12, use_scale=False)
WHITEN_PATCHES = 5000  # training images the whitening kernel is estimated from


def dirac_init(base=nn.initializers.lecun_normal()):
  """A kernel initialiser ``[kh, kw, Cin, Cout]``: ``base``, then output channels
  ``< min(Cin, Cout)`` replaced by the identity (torch.nn.init.dirac_), so each conv
  starts by passing its input through."""
  def init(key, shape, dtype=jnp.float32):
    kh, kw, cin, cout = shape
    n = min(cin, cout)
    identity = jnp.zeros((kh, kw, cin, n), dtype).at[kh // 2, kw // 2].set(jnp.eye(cin, n, dtype=dtype))
    return base(key, shape, dtype).at[..., :n].set(identity)
  return init


def whitening_kernel(images: np.ndarray, size: int = 2, eps: float = 5e-4) -> np.ndarray:
  """The ``[size, size, C, 2 * size * size * C]`` kernel that whitens the ``size x size``
  patches of ``images`` ``[N, H, W, C]`` (normalised floats): the eigenvectors of the patch
  second-moment matrix scaled by ``1 / sqrt(eigenvalue + eps)``, largest first, then the
  same negated (so a following GELU keeps both signs)."""
  _, h, w, c = images.shape
  patches = np.stack([images[:, i:h - size + 1 + i, j:w - size + 1 + j, :]
                      for i in range(size) for j in range(size)], axis=3)  # [N, h', w', s*s, C]
  flat = patches.reshape(-1, size * size * c).astype(np.float64)
  values, vectors = np.linalg.eigh(flat.T @ flat / len(flat))
  scaled = (vectors / np.sqrt(values + eps))[:, ::-1]  # [s*s*C, s*s*C], columns largest first
  kernel = scaled.reshape(size, size, c, size * size * c)
  return np.concatenate([kernel, -kernel], axis=-1).astype(np.float32)


class ConvGroup(nn.Module):
  """[conv3x3, maxpool2, BN, GELU, conv3x3, BN, GELU]: ``[B, H, W, C]`` -> ``[B, H//2, W//2, features]``."""
  features: int

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    conv = functools.partial(Conv, self.features, (3, 3), padding="SAME", use_bias=False,
                             kernel_init=dirac_init())
    x = pool(conv()(x), "max", 2)
    x = nn.gelu(BatchNorm(use_running_average=not train)(x), approximate=False)
    x = conv()(x)
    return nn.gelu(BatchNorm(use_running_average=not train)(x), approximate=False)


class AirbenchNet(nn.Module):
  """Input ``[B, 32, 32, C]`` (any H, W >= 9), logits ``[B, num_classes]``."""
  num_classes: int = 10
  widths: tuple[int, ...] = (64, 256, 256)
  whiten_size: int = 2
  logit_scale: float = 1 / 9

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    width = 2 * self.whiten_size ** 2 * x.shape[-1]
    x = nn.gelu(Conv(width, (self.whiten_size,) * 2, padding="VALID", name="whiten")(x),
                approximate=False)
    for i, features in enumerate(self.widths):
      x = ConvGroup(features, name=f"group{i + 1}")(x, train)
      self.sow("intermediates", f"group{i + 1}", x)
    x = x.max(axis=(1, 2))
    return Dense(self.num_classes, use_bias=False)(x) * self.logit_scale

  def data_init(self, images: np.ndarray,
                normalize: Callable[[jax.Array], jax.Array]) -> dict:
    """The variables set from the training data, ``{'params': {'whiten': {'kernel': ...}}}``:
    the whitening kernel of the first WHITEN_PATCHES training images ``[N, H, W, C]``
    (uint8, as the steps see them, then ``normalize``d).

    ``cnnjax.train.setup`` puts a model's ``data_init`` variables into a fresh (not
    pretrained or restored) state."""
    normalized = np.asarray(normalize(images[:WHITEN_PATCHES]), np.float32)
    return {"params": {"whiten": {"kernel": jnp.asarray(whitening_kernel(normalized, self.whiten_size))}}}
