"""Models by name: ``create_model('bn_cnn', num_classes=10)``.

Every model is a ``flax.linen`` module called as ``model.apply(variables, x, train=...)``
on normalised float inputs ``[B, H, W, C]`` and returns logits ``[B, num_classes]``.
Batch-norm statistics live in the ``batch_stats`` collection, dropout draws from the
``dropout`` rng, and named intermediates are sown into ``intermediates``.
"""
import dataclasses

import flax.linen as nn

from cnnjax.errors import UserError
from cnnjax.models.airbench import AirbenchNet
from cnnjax.models.bn_cnn import BNCNN
from cnnjax.models.blocks import ConvBlock
from cnnjax.models.efficientnet import EfficientNetLite
from cnnjax.models.lenet import LeNet
from cnnjax.models.mlp import MLP
from cnnjax.models.plain_cnn import KerasCatsDogs, KerasConvNet, PlainCNN, SimpleCNN, TinyImageNetCNN
from cnnjax.models.resnet import ResNet18, ResNet34, ResNet50
from cnnjax.models.seed_cnn import SeedCNN
from cnnjax.models.transfer_net import Head, TransferNet
from cnnjax.models.vgg import VGG, VGG16BN

MODELS: dict[str, type[nn.Module]] = {
    "seed_cnn": SeedCNN,
    "bn_cnn": BNCNN,
    "airbench": AirbenchNet,
    "lenet": LeNet,
    "keras_convnet": KerasConvNet,
    "keras_cats_dogs": KerasCatsDogs,
    "simple_cnn": SimpleCNN,
    "tiny_imagenet_cnn": TinyImageNetCNN,
    "plain_cnn": PlainCNN,
    "mlp": MLP,
    "resnet18": ResNet18,
    "resnet34": ResNet34,
    "resnet50": ResNet50,
    "vgg16": VGG,
    "vgg16_bn": VGG16BN,
    "efficientnet_lite0": EfficientNetLite,
    "transfer": TransferNet,
}
# The ImageNet architectures: with num_classes=0 they return features, for TransferNet.
BACKBONES = ("resnet18", "resnet34", "resnet50", "vgg16", "vgg16_bn", "efficientnet_lite0")


def create_model(name: str, **kwargs) -> nn.Module:
  """Builds the model registered as ``name`` with its constructor ``kwargs``."""
  if name not in MODELS:
    raise UserError(f"unknown model {name!r}; expected one of {sorted(MODELS)}")
  cls = MODELS[name]
  fields = {f.name for f in dataclasses.fields(cls)} - {"parent", "name"}
  unknown = sorted(set(kwargs) - fields)
  if unknown:
    raise UserError(f"model {name!r} has no option(s) {unknown}; expected some of {sorted(fields)}")
  kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}
  return cls(**kwargs)


def model_from_config(cfg) -> nn.Module:
  """The model of a ``model`` config: its keys but those that choose initial weights
  (``pretrained``, ``head_classes``) go to ``create_model``."""
  return create_model(**{k: v for k, v in cfg.to_dict().items()
                         if k not in ("pretrained", "head_classes")})


__all__ = ["MODELS", "BACKBONES", "create_model", "model_from_config", "ConvBlock", "SeedCNN", "BNCNN", "AirbenchNet", "LeNet",
           "KerasConvNet", "KerasCatsDogs", "SimpleCNN", "TinyImageNetCNN", "PlainCNN", "MLP", "ResNet18", "ResNet34", "ResNet50", "VGG", "VGG16BN",
           "EfficientNetLite", "Head", "TransferNet"]
