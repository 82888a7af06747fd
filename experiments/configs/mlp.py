r"""The fully connected baseline: 784 -> 128 ReLU -> 10, as keras_convnet.py otherwise.

  python -m experiments.train --config experiments/configs/mlp.py --workdir runs/mlp
  (offline: --config.data.source=../shared/data/mnist.npz)
"""
from experiments.configs import keras_convnet


def get_config():
  c = keras_convnet.get_config()
  c.model.name = "mlp"
  c.model.hidden = (128,)
  return c
