r"""The PyTorch CIFAR-10 notebook's SimpleCNN: conv 10, conv 10, max pool, dense 10; Adam 1e-3,
batch 32, 10 epochs, 40k/10k split: the course's recipe exactly (constant rate, no
augmentation).

  python -m experiments.train --config experiments/configs/cifar_simple.py --workdir runs/cifar_simple
  (offline: add --config.data.source=../shared/data/cifar10.npz)

The course reports 61.9% validation, 61.2% test accuracy. Result on this machine: see the
README's results table (`python -m experiments.course` reruns it). The notebook's
CustomCNN is configs/cifar_bn.py.
"""
from experiments.configs import default


def get_config():
  c = default.get_config()
  c.model.name = "simple_cnn"
  c.optimizer.name = "adam"
  c.optimizer.lr = 1e-3
  c.optimizer.eps = 1e-8  # torch.optim.Adam's default
  c.batch_size = 32
  c.num_epochs = 10
  c.data.val_size = 10_000
  return c
