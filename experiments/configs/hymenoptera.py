r"""Ants vs bees (the PyTorch transfer-learning tutorial's hymenoptera image folder, 244
train / 153 val images), from an ImageNet backbone. Argument: '<backbone>,<workflow>'
(experiments/configs/transfer_base.py).

  python -m experiments.transfer --workdir runs/hym_lite0_features \
      --config experiments/configs/hymenoptera.py:efficientnet_lite0,features \
      --config.data.source=../shared/data/hymenoptera
  python -m experiments.transfer --workdir runs/hym_lite0_frozen \
      --config experiments/configs/hymenoptera.py:efficientnet_lite0,frozen \
      --config.data.source=../shared/data/hymenoptera
  python -m experiments.transfer --workdir runs/hym_lite0_finetune \
      --config experiments/configs/hymenoptera.py:efficientnet_lite0,finetune \
      --config.data.source=../shared/data/hymenoptera --config.init_from=runs/hym_lite0_frozen

val/ is both the validation and the test split, as in the tutorial. ResNet-18 needs
torchvision's weights: online they are downloaded; offline put resnet18-f37072fd.pth in
~/.cache/torch/hub/checkpoints or pass --config.model.pretrained=/path/to/file.

Results on this machine (EfficientNet-Lite0, real ImageNet weights; val accuracy of the last
epoch, 153 images): features 93.5% (extraction 17 s, head 30 epochs in seconds), frozen
94.1% (15 epochs, ~15 s each), finetune from the frozen run 94.1% (10 epochs, ~15 s each).
For comparison, the ImageNet classifier itself, ant vs bee logit: 96.7% (zero_shot.py).
"""
from experiments.configs import transfer_base


def get_config(arg: str = "efficientnet_lite0,features"):
  backbone, workflow = transfer_base.parse(arg)
  c = transfer_base.transfer_config(backbone, workflow)
  c.data.source = "data/hymenoptera"
  c.data.image_size = 224
  c.model.num_classes = 2
  c.batch_size = 32
  c.eval_batch_size = 64
  c.optimizer.name = "adam"
  # features: the head alone on cached features, cheap; the others run the backbone.
  c.num_epochs, c.optimizer.lr = {"features": (30, 1e-4), "frozen": (15, 1e-3),
                                  "finetune": (10, 1e-4)}[workflow]
  return c
