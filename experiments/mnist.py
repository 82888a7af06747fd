"""`python -m experiments.mnist --config experiments/configs/<name>.py --workdir DIR`: see experiments.train."""
from experiments import main

if __name__ == "__main__":
  main.run()
