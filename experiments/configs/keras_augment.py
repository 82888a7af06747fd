r"""cifar_bn (BNCNN on CIFAR-10, one-cycle Adam to 1e-3, batch 32, 10 epochs) with the Keras book's
ImageDataGenerator set: rotation 40, width and height shift 0.2, shear 0.2 (degrees, as
Keras), zoom 0.2, horizontal flip, nearest fill.

  python -m experiments.train --config experiments/configs/keras_augment.py --workdir runs/keras_augment
  (offline: add --config.data.source=../shared/data/cifar10.npz)

See what it does to a training image:

  python -m experiments.show_augment --config experiments/configs/keras_augment.py --out runs/keras_augment

Result (2-core AMD EPYC, 2026-12-04, seed 0, the full `experiments.course` run): 68.5% on the
1,000 lossless test images, 63.7% on 10k (9k JPEG), val 69.6%, in 19.9 min: 16 points below
cifar_bn's 84.4% with the same 10 epochs. Rotations of 40 degrees, shears and zooms of CIFAR's
32x32 images need far more epochs to pay off (train accuracy still rose from 60% to 65% over the last three).
"""
from experiments.configs import cifar_bn


def get_config():
  c = cifar_bn.get_config()
  c.data.augment.crop_padding = 0
  c.data.augment.rotation = 40.0
  c.data.augment.width_shift = 0.2
  c.data.augment.height_shift = 0.2
  c.data.augment.shear = 0.2
  c.data.augment.zoom = 0.2
  c.data.augment.horizontal_flip = True
  c.data.augment.fill_mode = "nearest"
  return c
