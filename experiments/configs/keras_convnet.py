r"""The Keras book's MNIST convnet: 3 convs (32, 64, 64), dense 64, RMSprop (one-cycle to 1e-3), 5 epochs, batch 64.

  python -m experiments.train --config experiments/configs/keras_convnet.py --workdir runs/keras_convnet
  (offline: --config.data.source=../shared/data/mnist.npz)
"""
from experiments.configs import default


def get_config():
  c = default.get_config()
  c.model.name = "keras_convnet"
  c.data.source = "mnist"
  c.data.val_size = 0.1
  c.optimizer.name = "rmsprop"
  c.optimizer.lr = 1e-3
  c.batch_size = 64
  c.schedule.name = "one_cycle"  # the course's Adam/RMSprop at a one-cycle schedule peaking at lr
  c.num_epochs = 5
  c.eval_rotation = 25.0
  return c
