r"""The seed course's first CIFAR-10 study: SeedCNN, RMSprop 1e-3, batch 128, 3 epochs.

  python -m experiments.train --config experiments/configs/cifar_seed.py --workdir runs/cifar_seed
  (offline: add --config.data.source=../shared/data/cifar10.npz)

Result on this machine: see the README's results table.
"""
from experiments.configs import default


def get_config():
  c = default.get_config()
  c.model.name = "seed_cnn"
  c.optimizer.name = "rmsprop"
  c.optimizer.lr = 1e-3
  c.batch_size = 128
  c.num_epochs = 3
  return c
