r"""Modern LeNet-5 on MNIST: ReLU + max pooling, Adam 1e-3, batch 64, 10 epochs, 90/10 split,
mean/std from the training data, the best-validation-loss checkpoint tested.

  python -m experiments.mnist --config experiments/configs/lenet.py --workdir runs/lenet
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
  c.num_epochs = 10
  c.test_with = "best"
  c.eval_rotation = 25.0
  return c
