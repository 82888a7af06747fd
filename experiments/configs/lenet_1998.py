r"""LeNet-5 as in LeCun et al. 1998: sigmoid activations and average pooling (else as lenet.py).

  python -m experiments.train --config experiments/configs/lenet_1998.py --workdir runs/lenet_1998
  (offline: --config.data.source=../shared/data/mnist.npz)
"""
from experiments.configs import lenet


def get_config():
  c = lenet.get_config()
  c.model.activation = "sigmoid"
  c.model.pooling = "avg"
  return c
