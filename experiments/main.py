"""The shared entry point of the experiments: flags, config, one-line errors.

``--config`` names a config file (``experiments/configs/*.py``); ``--config.a.b=value``
overrides a key. Bad flags, unknown keys and bad input end with one ``error:`` line and
exit status 2 instead of a traceback; a run stopped by SIGTERM or Ctrl-C exits with 130
after saving a checkpoint.

Training uses every local device with no flag. On several machines, every process runs the
same command; ``--coordinator_address``, ``--num_processes`` and ``--process_id`` connect
them, or nothing under SLURM (``srun``), Open MPI (``mpirun``) or on a TPU slice, whose
environment JAX reads (``--distributed`` forces it on a Cloud TPU VM pod slice).
"""
import importlib.util
import pathlib
import sys

from absl import app, flags, logging
from ml_collections import config_flags

import cnnjax  # noqa: F401  (sets XLA CPU defaults before JAX starts)
from cnnjax.errors import UserError

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and plots.")
# Multi-host runs (see the README's "Several machines"); a single process needs none of these.
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "HOST:PORT of process 0 in a multi-process run (or set "
    "JAX_COORDINATOR_ADDRESS); not needed under SLURM, Open MPI or on a TPU slice.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in a multi-process run.",
                                      lower_bound=1)
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's id, 0 .. num_processes - 1.",
                                   lower_bound=0)
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", None, "--distributed: always call jax.distributed.initialize() (Cloud TPU VM pod "
    "slices); --nodistributed: never. Unset: only with the flags above or under a multi-process "
    "launcher (SLURM, Open MPI, TPU slice, JAX_COORDINATOR_ADDRESS).")


def _first_line(e: BaseException) -> str:
  lines = [line.strip() for line in str(e).replace("\\n", "\n").splitlines() if line.strip()]
  return lines[-1] if lines else type(e).__name__


def _load_config_file(path: str, arg: str | None = None):
  """``get_config()`` of the file at ``path``, or ``get_config(arg)`` (``file.py:arg``)."""
  spec = importlib.util.spec_from_file_location("_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config() if arg is None else module.get_config(arg)


def explain_flag_error(argv: list[str], error: BaseException) -> str:
  """One line saying which flag or config key is wrong, and what was expected."""
  values = {}
  for i, arg in enumerate(argv[1:], start=1):
    if arg.startswith("--") and "=" in arg:
      values.update([arg[2:].split("=", 1)])
    elif arg.startswith("--") and i + 1 < len(argv):  # --flag value
      values[arg[2:]] = argv[i + 1]
  if values.get("config") is None:
    return _first_line(error)
  path, colon, arg = values["config"].partition(":")
  if not pathlib.Path(path).is_file():
    return f"config file {path} not found; expected a file such as experiments/configs/cifar_bn.py"
  try:
    config = _load_config_file(path, arg if colon else None)
  except Exception as e:  # the file's own check of its argument, e.g. an unknown backbone
    return f"config file {values['config']}: {_first_line(e)}"
  for flag, value in values.items():
    if not flag.startswith("config."):
      continue
    node, keys = config, flag.split(".")[1:]
    for i, key in enumerate(keys):
      if not hasattr(node, "keys") or key not in node:
        where = ".".join(keys[:i]) or "the config"
        valid = sorted(node.keys()) if hasattr(node, "keys") else []
        return f"unknown config key {'.'.join(keys[:i + 1])!r}; keys in {where}: {valid}"
      node = node[key]
    if str(error).find(keys[-1]) >= 0:
      return f"bad value {value!r} for --{flag} (current value {node!r}): {_first_line(error)}"
  return _first_line(error)


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing, with any failure reported as one line (exit status 2)."""
  try:
    args = flags.FLAGS(argv)
    _CONFIG.value.keys()  # loads the file and applies the overrides now
    return args
  except Exception as e:  # absl/ml_collections raise many types, all with deep tracebacks
    print(f"error: {explain_flag_error(argv, e)}", file=sys.stderr)
    sys.exit(2)


def _main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  logging.set_verbosity(logging.WARNING)
  from cnnjax import parallel
  try:
    # Before anything else touches JAX (train is imported after it for that reason).
    parallel.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                                    _DISTRIBUTED.value)
    from cnnjax import train
    result = train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  if result.get("interrupted"):
    sys.exit(130)


def run():
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(_main, flags_parser=parse_flags)
