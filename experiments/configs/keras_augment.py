r"""cifar_bn (BNCNN on CIFAR-10, one-cycle Adam to 1e-3, batch 32, 10 epochs) with the Keras book's
ImageDataGenerator set: rotation 40, width and height shift 0.2, shear 0.2 (degrees, as
Keras), zoom 0.2, horizontal flip, nearest fill.

  python -m experiments.train --config experiments/configs/keras_augment.py --workdir runs/keras_augment
  (offline: add --config.data.source=../shared/data/cifar10.npz)

See what it does to a training image:

  python -m experiments.show_augment --config experiments/configs/keras_augment.py --out runs/keras_augment

Result: not run yet on this machine.
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
