r"""The PyTorch CIFAR-10 notebook's SimpleCNN: conv 10, conv 10, max pool, dense 10; Adam 1e-3,
batch 32, 10 epochs, 40k/10k split: the course's recipe exactly (constant rate, no
augmentation).

  python -m experiments.train --config experiments/configs/cifar_simple.py --workdir runs/cifar_simple
  (offline: add --config.data.source=../shared/data/cifar10.npz)

The course reports 61.9% validation, 61.2% test accuracy. Result (2-core AMD EPYC,
2026-12-04, seed 0, `python -m experiments.course --only simple_cnn`): 60.5% validation,
59.8% on the 1,000 lossless test images, 59.3% on all 10k (9k JPEG), in 120 s. cnnjax's
improved form (--config.schedule.name=one_cycle --config.eval_flip=True: the same peak rate
as a one-cycle schedule, test-time flips) gets 66.0% / 66.9% / 64.6% in 2.2 min. The
notebook's CustomCNN is configs/cifar_bn.py.
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
