r"""Learning-rate finder for any study: a short run with the learning rate growing exponentially.

  python -m experiments.lr_find --config experiments/configs/cifar_bn.py --workdir runs/lr_cifar_bn \
      [--start_lr=1e-7 --end_lr=10 --num_steps=100] [--config.key=value ...]

Starts from the config's initial weights with its optimizer, batch size and augmentation,
stops when the smoothed loss exceeds 4x its minimum, and writes ``lr_find.png`` (loss
against lr, the three suggestions marked) and ``lr_find.json`` (the curve and the suggestions)
into the workdir. Nothing is trained for real and no checkpoint is written.
"""
from absl import flags

from experiments import entry

FLAGS = entry.command_flags()
_START_LR = flags.DEFINE_float("start_lr", 1e-7, "first learning rate of the sweep",
                               flag_values=FLAGS)
_END_LR = flags.DEFINE_float("end_lr", 10.0, "last learning rate of the sweep", flag_values=FLAGS)
_NUM_STEPS = flags.DEFINE_integer("num_steps", 100, "optimizer steps from start_lr to end_lr",
                                  flag_values=FLAGS)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for lr_find.png and lr_find.json.",
                               flag_values=FLAGS)


def main(config) -> None:
  """Runs the sweep on the flags' config and writes the PNG and the JSON."""
  from cnnjax import lr_finder
  sweep = lr_finder.Sweep(_START_LR.value, _END_LR.value, _NUM_STEPS.value)
  curve = lr_finder.find_lr(config, sweep=sweep)
  curve.write(_WORKDIR.value)
  print(f"{curve.summary()} | wrote {_WORKDIR.value}/lr_find.png")


def cli(argv: list[str] | None = None) -> None:
  """Runs the command on ``argv`` (default ``sys.argv``); exits with its status."""
  entry.run(main, doc=__doc__, fv=FLAGS, config=True, required=["workdir"], argv=argv)


if __name__ == "__main__":
  cli()
