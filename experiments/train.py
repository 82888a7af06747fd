r"""Train and evaluate any study from its config file.

  python -m experiments.train --config experiments/configs/cifar_bn.py --workdir runs/cifar_bn \
      [--config.key=value ...]

The config file chooses the model, the data and the recipe (``experiments/configs``; each
opens with its command and result). Rerunning with the same ``--workdir`` resumes from the
last intact checkpoint with the exact next batch (a finished run is left as it is; another
config is refused, ``--new_run`` moves the earlier run to ``WORKDIR/previous/N/``); one run
at a time holds a workdir. Ctrl-C or SIGTERM saves a checkpoint first and exits with status
130. Training uses every local device with no flag; on several machines
every process runs the same command (``--coordinator_address``, ``--num_processes``,
``--process_id``, or nothing under SLURM, Open MPI or on a TPU slice).
"""
from absl import flags

from experiments import entry

FLAGS = entry.command_flags(distributed=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and plots.",
                               flag_values=FLAGS)
_NEW_RUN = flags.DEFINE_bool("new_run", False, "Start a new run in a --workdir that holds "
                             "another: that run moves to WORKDIR/previous/N/ first.",
                             flag_values=FLAGS)


def main(config) -> int:
  from cnnjax import train  # after the entry's restart and distributed start
  result = train.train_and_evaluate(config, _WORKDIR.value, _NEW_RUN.value)
  return entry.INTERRUPTED if result.get("interrupted") else 0


def cli(argv: list[str] | None = None) -> None:
  """Runs the command on ``argv`` (default ``sys.argv``); exits with its status."""
  entry.run(main, doc=__doc__, fv=FLAGS, config=True, required=["workdir"], argv=argv)


if __name__ == "__main__":
  cli()
