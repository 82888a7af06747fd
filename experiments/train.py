r"""Train and evaluate any study from its config file.

  python -m experiments.train --config experiments/configs/cifar_bn.py --workdir runs/cifar_bn \
      [--config.key=value ...]

``experiments.cifar`` and ``experiments.mnist`` are the same command under the names the
course uses; the config file chooses the model and the data.
"""
from experiments import main

if __name__ == "__main__":
  main.run()
