r"""Evaluation report of a finished run on its test set.

  python -m experiments.report --workdir runs/cifar_bn [--which=best|latest] [--mistakes=16]

Restores the run's best checkpoint (lowest validation loss; ``--which=latest`` for the
last one) and writes into ``RUN/report/``: ``report.json`` (accuracy, loss, per-class and
macro precision/recall/F1, confusion matrix, the most confident mistakes),
``confusion.png`` (row-normalised) and ``mistakes.png`` (the most confident mistakes,
titled "true / pred (p=0.97)").
"""
from absl import flags

from experiments import entry

FLAGS = entry.command_flags()
_WORKDIR = flags.DEFINE_string("workdir", None, "the --workdir of a finished experiment",
                               flag_values=FLAGS)
_WHICH = flags.DEFINE_enum("which", "best", ["best", "latest"], "checkpoint to evaluate",
                           flag_values=FLAGS)
_MISTAKES = flags.DEFINE_integer("mistakes", 16, "how many confident mistakes to show", lower_bound=0,
                                 flag_values=FLAGS)


def main() -> None:
  """Writes the report of the flags' run and prints its summary line."""
  from cnnjax import evaluate
  result = evaluate.write_report(_WORKDIR.value, _WHICH.value, _MISTAKES.value)
  print(f"{evaluate.format_report(result)} | wrote {_WORKDIR.value}/report/")


def cli(argv: list[str] | None = None) -> None:
  """Runs the command on ``argv`` (default ``sys.argv``); exits with its status."""
  entry.run(main, doc=__doc__, fv=FLAGS, required=["workdir"], argv=argv)


if __name__ == "__main__":
  cli()
