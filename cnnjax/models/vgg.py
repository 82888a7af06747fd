"""VGG-16 in torchvision's layout with Keras' layer names, so either's weights fit.

Layout (torchvision ``vgg16``/``vgg16_bn``): five blocks of 2, 2, 3, 3, 3 convolutions 3x3
(padding 1, with bias; ``_bn``: each followed by BatchNorm) of 64, 128, 256, 512, 512
channels, each conv followed by ReLU and each block by a 2x2/2 max pool (floor); then
torch's ``AdaptiveAvgPool2d((7, 7))`` and the classifier 25088 -> 4096 -> 4096 ->
num_classes with ReLU and dropout 0.5 after each of the first two.

Names follow Keras' ``VGG16`` (``block1_conv1`` .. ``block5_conv3``, ``fc1``, ``fc2``,
``predictions``; ``block1_bn1``, ... for the BN variant), which reads better in freezing
rules (``backbone/block5_.*``) than torch's ``features.28``; ``torch_module_names`` is the
key map ``cnnjax.weights`` converts torchvision's state_dicts with.
"""
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from cnnjax.errors import UserError
from cnnjax.models.batch_norm import BatchNorm, conv_norm
from cnnjax.models.blocks import adaptive_avg_pool, pool
from cnnjax.models.conv import Conv
from cnnjax.models.dense import Dense
from cnnjax.models.dropout import Dropout
from cnnjax.models.resnet import conv_kernel_init

VGG16_BLOCKS = ((64, 2), (128, 2), (256, 3), (512, 3), (512, 3))  # (channels, convs)
POOLED_SIZE = 7  # the classifier's input is 7 x 7 x 512, whatever the image size
CLASSIFIER = {"classifier.0": "fc1", "classifier.3": "fc2", "classifier.6": "predictions"}

# torchvision's init: kaiming_normal_(fan_out, relu) convs, normal(0, 0.01) linears, zero biases.
dense_kernel_init = nn.initializers.normal(0.01)


def torch_module_names(blocks: Sequence[tuple[int, int]] = VGG16_BLOCKS,
                       batch_norm: bool = False) -> dict[str, str]:
  """torchvision module name -> flax module name: ``features.28`` -> ``block5_conv3``.

  torchvision numbers the layers of ``features`` in order: conv, (BN,) ReLU per conv and a
  max pool per block; only convs and BNs hold weights.
  """
  names, index = {}, 0
  for block, (_, convs) in enumerate(blocks, start=1):
    for conv in range(1, convs + 1):
      names[f"features.{index}"] = f"block{block}_conv{conv}"
      index += 1
      if batch_norm:
        names[f"features.{index}"] = f"block{block}_bn{conv}"
        index += 1
      index += 1  # ReLU
    index += 1  # max pool
  return {**names, **CLASSIFIER}


class VGG(nn.Module):
  """VGG; the defaults are torchvision's ``vgg16`` (138,357,544 params).

  Attributes:
    blocks: ``(channels, convs)`` per block.
    num_classes: size of the classifier; 0 (Keras' ``include_top=False``) drops pooling and
      classifier and returns the last block's feature map ``[B, H/32, W/32, 512]``
      (``[B, 4, 4, 512]`` for 150x150 images).
    batch_norm: BatchNorm after every conv (torchvision's ``vgg16_bn``).
    dropout_rate: dropout after ``fc1`` and ``fc2`` while training (needs a ``'dropout'`` rng).
    bn_momentum: flax BatchNorm momentum (0.9 == torch's 0.1).

  Intermediates (``mutable=['intermediates']``): ``block1`` .. ``block5`` (after each
  pool) and ``features`` (the flattened 25088 classifier input).
  """
  blocks: Sequence[tuple[int, int]] = VGG16_BLOCKS
  num_classes: int = 1000
  batch_norm: bool = False
  dropout_rate: float = 0.5
  bn_momentum: float = 0.9

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """Maps normalised images ``[B, H, W, 3]`` (H, W >= 32) to logits ``[B, num_classes]``
    (or the feature map when ``num_classes == 0``)."""
    if x.ndim != 4:
      raise UserError(f"VGG input has shape {x.shape}; expected NHWC [B, H, W, C]")
    if self.num_classes < 0:
      raise UserError(f"num_classes={self.num_classes}; expected >= 0 (0: no classifier)")
    for block, (features, convs) in enumerate(self.blocks, start=1):
      for conv in range(1, convs + 1):
        layer = Conv(features, (3, 3), padding=((1, 1), (1, 1)), kernel_init=conv_kernel_init,
                     relu=not self.batch_norm, name=f"block{block}_conv{conv}")
        if self.batch_norm:
          x = conv_norm(layer, BatchNorm(use_running_average=not train, momentum=self.bn_momentum,
                                         epsilon=1e-5, activation="relu",
                                         name=f"block{block}_bn{conv}"), x)
        else:
          x = layer(x)
      x = pool(x, "max", 2)
      self.sow("intermediates", f"block{block}", x)
    if self.num_classes == 0:
      return x
    x = adaptive_avg_pool(x, POOLED_SIZE)
    # torch flattens NCHW (channel-major): the order classifier.0's weight expects.
    x = jnp.transpose(x, (0, 3, 1, 2)).reshape(x.shape[0], -1)
    self.sow("intermediates", "features", x)
    for name in ("fc1", "fc2"):
      x = nn.relu(Dense(4096, kernel_init=dense_kernel_init, name=name)(x))
      x = Dropout(self.dropout_rate, deterministic=not train)(x)
    return Dense(self.num_classes, kernel_init=dense_kernel_init, name="predictions")(x)


class VGG16BN(VGG):
  """torchvision ``vgg16_bn``: VGG-16 with BatchNorm after every conv; 138,365,992 params."""
  batch_norm: bool = True
