r"""ResNet-18 on Tiny ImageNet, trained from scratch: a 3x3 stem without max pooling (64x64
inputs keep 8x8 maps in the last stage), Adam one-cycle to 2e-3, batch 128, 15 epochs,
label smoothing 0.1, 4-pixel crops and flips, test-time flips; mean/std normalization.

  python -m experiments.train --config experiments/configs/tiny_imagenet_resnet18.py --workdir runs/tiny_resnet18
  (offline: --config.data.source=/path/tiny-imagenet-200.zip)

Not run on this machine (no copy of Tiny ImageNet here, and ~20 min per epoch on two CPU
cores would make it an overnight run); configs/tiny_imagenet_cnn.py is the R book's recipe.
"""
from experiments.configs import tiny_imagenet_cnn


def get_config():
  c = tiny_imagenet_cnn.get_config()
  c.model.name = "resnet18"
  c.model.cifar_stem = True
  c.data.normalization = "dataset"
  c.optimizer.lr = 2e-3
  c.schedule.name = "one_cycle"
  c.num_epochs = 15
  c.label_smoothing = 0.1
  c.data.augment.crop_padding = 4
  c.data.augment.horizontal_flip = True
  c.eval_flip = True
  return c
