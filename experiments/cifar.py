r"""CIFAR-10 (and any 10-class image data) studies from a config file.

  python -m experiments.cifar --config experiments/configs/cifar_bn.py --workdir runs/cifar_bn \
      [--config.key=value ...]
"""
from experiments import main

if __name__ == "__main__":
  main.run()
