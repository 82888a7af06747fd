"""ResNet-18/34/50 in torchvision's layout, so its ImageNet weights convert one to one.

Layout (torchvision ``resnet18``/``resnet34``/``resnet50``): a 7x7/2 conv stem (padding 3)
with BN and ReLU, a 3x3/2 max pool (padding 1, padded with -inf), four stages of residual blocks with
64/128/256/512 base widths (stages 2-4 start with stride 2 and a 1x1/2 conv + BN projection
shortcut; ResNet-50's bottleneck blocks widen 4x, so its first block projects too), global
average pooling and a dense classifier. Convolutions have no bias; 3x3
convolutions use explicit ``((1, 1), (1, 1))`` padding, which matches torch's ``padding=1``
also when strided (flax's ``'SAME'`` would pad only after). BatchNorm uses epsilon 1e-5 and
flax momentum 0.9 (= torch momentum 0.1).

Submodule names mirror torchvision's state_dict (``layer2.0.downsample.0`` is
``layer2_0/downsample_0``), so ``cnnjax.weights`` converts keys mechanically.

A new depth needs only a block class with an ``expansion`` class attribute and the
``(features, strides, conv, norm)`` fields (``norm``: a ``cnnjax.models.batch_norm.BatchNorm``
partial, whose ``activation`` applies the ReLU after it): ResNet-50 is
``ResNet(stage_sizes=(3, 4, 6, 3), block_cls=Bottleneck)``.
"""
import functools
from collections.abc import Sequence
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from cnnjax.errors import UserError
from cnnjax.models.batch_norm import BatchNorm, conv_norm
from cnnjax.models.blocks import window_max_pool
from cnnjax.models.conv import Conv
from cnnjax.models.dense import Dense

ModuleDef = Any

# torchvision's init: kaiming_normal_(mode='fan_out', nonlinearity='relu'), untruncated.
conv_kernel_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")

_PAD1 = ((1, 1), (1, 1))


def projection_shortcut(x: jax.Array, features: int, strides: int, conv: ModuleDef,
                        norm: ModuleDef) -> jax.Array:
  """torchvision's ``downsample``: 1x1 conv with stride + BN, ``[B, H, W, C]`` ->
  ``[B, H/strides, W/strides, features]``. Call it inside a block's compact method."""
  return conv_norm(conv(features, (1, 1), strides=(strides, strides), padding="VALID",
                        name="downsample_0"), norm(name="downsample_1"), x)


class BasicBlock(nn.Module):
  """Two 3x3 convs with a residual connection (torchvision ``BasicBlock``).

  Maps ``[B, H, W, C]`` to ``[B, H/strides, W/strides, features]``; the shortcut is a
  projection when the stride or the channel count changes, else the identity.
  """
  features: int
  strides: int
  conv: ModuleDef
  norm: ModuleDef
  expansion: ClassVar[int] = 1

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    residual = x
    y = conv_norm(self.conv(self.features, (3, 3), strides=(self.strides, self.strides),
                            padding=_PAD1, name="conv1"),
                  self.norm(name="bn1", activation="relu"), x)
    y = conv_norm(self.conv(self.features, (3, 3), padding=_PAD1, name="conv2"),
                  self.norm(name="bn2"), y)
    if self.strides != 1 or x.shape[-1] != self.features * self.expansion:
      residual = projection_shortcut(x, self.features * self.expansion, self.strides,
                                     self.conv, self.norm)
    return nn.relu(y + residual)


class Bottleneck(nn.Module):
  """1x1 reduce, 3x3, 1x1 expand (x4) convs with a residual connection (torchvision
  ``Bottleneck``, "ResNet v1.5": the stride sits on the 3x3 conv, not the first 1x1).

  Maps ``[B, H, W, C]`` to ``[B, H/strides, W/strides, 4 * features]``; the shortcut is a
  projection when the stride or the channel count changes, else the identity.
  """
  features: int
  strides: int
  conv: ModuleDef
  norm: ModuleDef
  expansion: ClassVar[int] = 4

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    residual = x
    y = conv_norm(self.conv(self.features, (1, 1), padding="VALID", name="conv1"),
                  self.norm(name="bn1", activation="relu"), x)
    y = conv_norm(self.conv(self.features, (3, 3), strides=(self.strides, self.strides),
                            padding=_PAD1, name="conv2"),
                  self.norm(name="bn2", activation="relu"), y)
    y = conv_norm(self.conv(self.features * self.expansion, (1, 1), padding="VALID",
                            name="conv3"), self.norm(name="bn3"), y)
    if self.strides != 1 or x.shape[-1] != self.features * self.expansion:
      residual = projection_shortcut(x, self.features * self.expansion, self.strides,
                                     self.conv, self.norm)
    return nn.relu(y + residual)


class ResNet(nn.Module):
  """A torchvision-layout ResNet.

  Attributes:
    stage_sizes: number of blocks in each of the stages (``layer1``, ``layer2``, ...).
    block_cls: the residual block class (``BasicBlock`` or ``Bottleneck``).
    num_classes: size of the classifier; 0 drops the classifier and returns the pooled
      features ``[B, 512 * expansion]`` instead of logits (feature extraction).
    cifar_stem: replace the 7x7/2 conv + max pool stem by one 3x3/1 conv (no pooling),
      for 32x32 images trained from scratch; torchvision weights then no longer fit
      ``conv1``.
    bn_momentum: flax BatchNorm momentum (0.9 == torch's 0.1).
    bn_epsilon: BatchNorm epsilon (torchvision: 1e-5).

  Intermediates (``mutable=['intermediates']``): ``stem`` (the input of ``layer1``),
  ``stage1`` .. ``stage4`` (outputs of ``layer1`` .. ``layer4``), ``features`` (pooled).
  """
  stage_sizes: Sequence[int]
  block_cls: ModuleDef
  num_classes: int = 1000
  cifar_stem: bool = False
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-5

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """Maps normalised images ``[B, H, W, 3]`` float32 to logits ``[B, num_classes]``
    (or pooled features ``[B, 512 * expansion]`` when ``num_classes == 0``)."""
    if x.ndim != 4:
      raise UserError(f"ResNet input has shape {x.shape}; expected NHWC [B, H, W, C]")
    if self.num_classes < 0:
      raise UserError(f"num_classes={self.num_classes}; expected >= 0 (0: no classifier)")
    conv = functools.partial(Conv, use_bias=False, kernel_init=conv_kernel_init)
    norm = functools.partial(BatchNorm, use_running_average=not train,
                             momentum=self.bn_momentum, epsilon=self.bn_epsilon)
    if self.cifar_stem:
      x = conv_norm(conv(64, (3, 3), padding=_PAD1, name="conv1"),
                    norm(name="bn1", activation="relu"), x)
    else:
      x = conv_norm(conv(64, (7, 7), strides=(2, 2), padding=((3, 3), (3, 3)), name="conv1"),
                    norm(name="bn1", activation="relu"), x)
      x = window_max_pool(x, 3, 2, _PAD1)  # pads with -inf
    self.sow("intermediates", "stem", x)
    for stage, num_blocks in enumerate(self.stage_sizes):
      for index in range(num_blocks):
        strides = 2 if stage > 0 and index == 0 else 1
        x = self.block_cls(features=64 * 2**stage, strides=strides, conv=conv, norm=norm,
                           name=f"layer{stage + 1}_{index}")(x)
      self.sow("intermediates", f"stage{stage + 1}", x)
    x = jnp.mean(x, axis=(1, 2))
    self.sow("intermediates", "features", x)
    if self.num_classes == 0:
      return x
    return Dense(self.num_classes, name="fc")(x)


class ResNet18(ResNet):
  """torchvision ``resnet18``: BasicBlock, stages (2, 2, 2, 2); 11,689,512 params."""
  stage_sizes: Sequence[int] = (2, 2, 2, 2)
  block_cls: ModuleDef = BasicBlock


class ResNet34(ResNet):
  """torchvision ``resnet34``: BasicBlock, stages (3, 4, 6, 3); 21,797,672 params."""
  stage_sizes: Sequence[int] = (3, 4, 6, 3)
  block_cls: ModuleDef = BasicBlock


class ResNet50(ResNet):
  """torchvision ``resnet50`` (v1.5): Bottleneck, stages (3, 4, 6, 3); 25,557,032 params."""
  stage_sizes: Sequence[int] = (3, 4, 6, 3)
  block_cls: ModuleDef = Bottleneck
