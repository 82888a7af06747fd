r"""Evaluation report of a finished run on its test set.

  python -m experiments.report --workdir runs/cifar_bn [--which=best|latest] [--mistakes=16]

Restores the run's best checkpoint (lowest validation loss; ``--which=latest`` for the
last one) and writes into ``RUN/report/``: ``report.json`` (accuracy, loss, per-class and
macro precision/recall/F1, confusion matrix, the most confident mistakes),
``confusion.png`` (row-normalised) and ``mistakes.png`` (the most confident mistakes,
titled "true / pred (p=0.97)").
"""
from absl import flags

from cnnjax import inference, report
from experiments import cli

_WORKDIR = flags.DEFINE_string("workdir", None, "the --workdir of a finished experiment")
_WHICH = flags.DEFINE_enum("which", "best", list(inference.CHECKPOINTS), "checkpoint to evaluate")
_MISTAKES = flags.DEFINE_integer("mistakes", 16, "how many confident mistakes to show", lower_bound=0)


def write() -> None:
  """Writes the report of the flags' run and prints its summary line."""
  result = report.write_report(_WORKDIR.value, _WHICH.value, _MISTAKES.value)
  print(f"{report.format_report(result)} | wrote {_WORKDIR.value}/report/")


if __name__ == "__main__":
  flags.mark_flags_as_required(["workdir"])
  cli.run(write)
