r"""A seconds-long smoke run of the CIFAR experiment: SeedCNN on 256 images, 2 epochs of 12 steps.

  python -m experiments.train --config experiments/configs/runlocal.py --workdir /tmp/runlocal \
      --config.data.source=../shared/data/cifar10.npz

For checking the plumbing (data, steps, checkpoints, plots), not for accuracy.
"""
from experiments.configs import default


def get_config():
  c = default.get_config()
  c.model.name = "seed_cnn"
  c.batch_size = 16
  c.eval_batch_size = 16
  c.num_epochs = 2
  c.data.val_size = 0.2
  c.data.limit = 256
  c.data.augment.crop_padding = 4
  c.data.augment.horizontal_flip = True
  c.log_every_steps = 1
  return c
