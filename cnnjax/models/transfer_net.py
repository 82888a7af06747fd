"""A pretrained backbone with a new classifier head, for transfer learning.

``TransferNet(backbone='efficientnet_lite0', num_classes=2, hidden=(256,), dropout_rate=0.5)``
is the registered backbone without its classifier (``num_classes=0``: pooled features, or
VGG's feature map) under ``backbone/``, then ``Head`` under ``head/``. Those two prefixes
are what freezing rules match (``optimizer.groups = ('backbone/.*:frozen', 'head/.*:1.0')``);
which parts run in inference mode follows from the rules (``cnnjax.transfer``), not from
the model.
"""
from collections.abc import Sequence

import flax.linen as nn
import jax

from cnnjax.errors import UserError
from cnnjax.models.dense import Dense
from cnnjax.models.dropout import Dropout


class Head(nn.Module):
  """Flatten, ``Dense + ReLU`` per hidden width, dropout, then the output layer.

  The Keras courses' heads: ``hidden=(256,), dropout_rate=0.5`` (VGG16 feature
  extraction), ``hidden=(), dropout_rate=0.2`` (ResNet-50, EfficientNet). Maps features
  ``[B, ...]`` to logits ``[B, num_classes]`` (one logit for a sigmoid classifier).
  """
  num_classes: int
  hidden: Sequence[int] = ()
  dropout_rate: float = 0.0

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    x = x.reshape(x.shape[0], -1)
    for index, width in enumerate(self.hidden):
      x = nn.relu(Dense(width, name=f"hidden_{index}")(x))
    if self.dropout_rate:
      x = Dropout(self.dropout_rate, deterministic=not train)(x)
    return Dense(self.num_classes, name="output")(x)


class TransferNet(nn.Module):
  """A registered backbone (``backbone/``) without its classifier, then a ``Head`` (``head/``).

  Attributes:
    backbone: one of ``cnnjax.models.BACKBONES`` ('resnet18', 'resnet50', 'vgg16',
      'efficientnet_lite0', ...).
    num_classes, hidden, dropout_rate: the ``Head``'s.
  """
  backbone: str
  num_classes: int
  hidden: Sequence[int] = ()
  dropout_rate: float = 0.0

  @nn.nowrap  # builds a submodule inside __call__, an unbound module outside
  def backbone_model(self, **kwargs) -> nn.Module:
    """The backbone alone: ``create_model(backbone, num_classes=0)``; maps images
    ``[B, H, W, 3]`` to features (``[B, D]``, or ``[B, h, w, C]`` for VGG)."""
    from cnnjax.models import BACKBONES, MODELS  # the registry imports this module
    if self.backbone not in BACKBONES:
      raise UserError(f"unknown backbone {self.backbone!r}; expected one of {list(BACKBONES)}")
    return MODELS[self.backbone](num_classes=0, **kwargs)

  @nn.nowrap
  def head_model(self, **kwargs) -> Head:
    """The head alone: maps backbone features to logits ``[B, num_classes]``."""
    return Head(self.num_classes, self.hidden, self.dropout_rate, **kwargs)

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """Maps normalised images ``[B, H, W, 3]`` to logits ``[B, num_classes]``."""
    features = self.backbone_model(name="backbone")(x, train)
    return self.head_model(name="head")(features, train)
