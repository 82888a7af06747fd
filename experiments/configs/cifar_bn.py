r"""The course's batch-norm CNN on CIFAR-10: BNCNN, Adam 1e-3, batch 32, 10 epochs, 40k/10k split.

  python -m experiments.cifar --config experiments/configs/cifar_bn.py --workdir runs/cifar_bn
  (offline: add --config.data.source=../shared/data/cifar10.npz)

The course's PyTorch notebook reports 83.0% test accuracy after 10 epochs; this config's
result on this machine is in the README's results table. Like the notebook it trains
without augmentation; add --config.data.augment.crop_padding=4
--config.data.augment.horizontal_flip=True for random crops and flips.
"""
from experiments.configs import default


def get_config():
  c = default.get_config()
  c.model.name = "bn_cnn"
  c.optimizer.name = "adam"
  c.optimizer.lr = 1e-3
  c.optimizer.eps = 1e-8  # torch.optim.Adam's default, as in the course notebook
  c.batch_size = 32
  c.num_epochs = 10
  c.data.val_size = 10_000
  return c
