r"""Learning-rate finder for any study: a short run with the learning rate growing exponentially.

  python -m experiments.lr_find --config experiments/configs/cifar_bn.py --workdir runs/lr_cifar_bn \
      [--start_lr=1e-7 --end_lr=10 --num_steps=100] [--config.key=value ...]

Starts from the config's initial weights with its optimizer, batch size and augmentation,
stops when the smoothed loss exceeds 4x its minimum, and writes ``lr_find.png`` (loss
against lr, both suggestions marked) and ``lr_find.json`` (the curve and the suggestions)
into the workdir. Nothing is trained for real and no checkpoint is written.
"""
from absl import flags

from cnnjax import lr_finder
from experiments import cli, main

_START_LR = flags.DEFINE_float("start_lr", 1e-7, "first learning rate of the sweep")
_END_LR = flags.DEFINE_float("end_lr", 10.0, "last learning rate of the sweep")
_NUM_STEPS = flags.DEFINE_integer("num_steps", 100, "optimizer steps from start_lr to end_lr")


def find() -> None:
  """Runs the sweep on the flags' config and writes the PNG and the JSON."""
  sweep = lr_finder.Sweep(_START_LR.value, _END_LR.value, _NUM_STEPS.value)
  curve = lr_finder.find_lr(flags.FLAGS.config, sweep=sweep)
  curve.write(flags.FLAGS.workdir)
  print(f"{curve.summary()} | wrote {flags.FLAGS.workdir}/lr_find.png")


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  cli.run(find, flags_parser=main.parse_flags)
