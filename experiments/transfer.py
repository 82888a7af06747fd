"""`python -m experiments.transfer --config experiments/configs/<name>.py[:args] --workdir DIR`.

The transfer-learning studies are ordinary runs of the one training loop (see
experiments.train): the config carries the backbone, its pretrained weights, the freezing
rules, feature extraction and the run to start from.
"""
from experiments import main

if __name__ == "__main__":
  main.run()
