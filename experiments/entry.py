"""The one entry of every command: process settings, flags and config, distributed start,
one error path.

``run(main, ...)`` does, in order:

1. **Process settings** (``cnnjax.runtime.process_environment``): XLA:CPU's flags, and
   glibc's malloc tunables for XLA's per-step buffers. glibc reads its tunables only when
   a process starts, so a ``python -m experiments.<command>`` restarts itself once here,
   before it imports JAX, when one is missing (``CNNJAX_MALLOC=0`` turns that
   off). This is the only place cnnjax changes the environment or restarts a process.
2. **Flags**: absl flags of the command, and ``--config FILE[:ARG]`` with
   ``--config.key=value`` overrides, each checked against the key's type; an unknown key,
   a bad value or a stray argument ends in one ``error:`` line (exit status 2). ``--help``
   lists the flags and every config key with its value and meaning. A local ``.npz`` the
   config names starts loading in a thread then (``sources.read_ahead``), while the command
   goes on to import JAX.
3. **Distributed start** (commands that train): ``jax.distributed.initialize`` when the flags
   or a multi-process launcher ask for it, then the kernel choice (``runtime.configure``).
4. ``main(config)`` (or ``main()``); a ``UserError`` ends in one ``error:`` line (exit 2),
   a run stopped by a signal exits with 130.
5. **Exit**, once ``main`` has returned: a command's process (``python -m
   experiments.<command>``) ends when its non-daemon threads are joined, the ``atexit``
   handlers have run and stdout and stderr are flushed, skipping the interpreter's teardown
   of JAX and XLA, which writes nothing and took 0.59 s (``end_process``). ``--help``, an
   ``error:`` line and a ``KeyboardInterrupt`` out of ``main`` exit the usual way.
"""
import ast
import atexit
import importlib.util
import logging as std_logging
import os
import pathlib
import sys
import threading
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from absl import flags, logging

_MULTIHOST_FLAGS = ("coordinator_address", "num_processes", "process_id", "distributed")


def command_flags(distributed: bool = False) -> flags.FlagValues:
  """A command's own absl flags (its module defines them with ``flag_values=``), so that
  commands never share absl's global ``FLAGS``; ``distributed``: with the multi-process
  flags of the commands that train."""
  fv = flags.FlagValues()
  if distributed:
    flags.DEFINE_string(
        "coordinator_address", None, "HOST:PORT of process 0 in a multi-process run (or set "
        "JAX_COORDINATOR_ADDRESS); not needed under SLURM, Open MPI or on a TPU slice.",
        flag_values=fv)
    flags.DEFINE_integer("num_processes", None, "Processes in a multi-process run.",
                         lower_bound=1, flag_values=fv)
    flags.DEFINE_integer("process_id", None, "This process's id, 0 .. num_processes - 1.",
                         lower_bound=0, flag_values=fv)
    flags.DEFINE_bool(
        "distributed", None, "--distributed: always call jax.distributed.initialize() (Cloud TPU "
        "VM pod slices); --nodistributed: never. Unset: only with the flags above or under a "
        "multi-process launcher (SLURM, Open MPI, TPU slice, JAX_COORDINATOR_ADDRESS).",
        flag_values=fv)
  return fv
INTERRUPTED = 130


def _main_module() -> str:
  """The module of ``python -m MODULE ...`` this process runs ('' otherwise)."""
  argv = sys.orig_argv
  return argv[2] if len(argv) >= 3 and argv[1] == "-m" else ""


def _is_command() -> bool:
  """Whether this process is ``python -m experiments.<command>``."""
  return _main_module().split(".")[0] == "experiments"


def end_process(status: int) -> NoReturn:
  """Step 5 of ``run``: ends the process with ``status``. First what a normal exit does
  first, in its order: thread pools are told to stop and non-daemon threads (an orbax
  checkpoint's writer) joined (``threading._shutdown``), then the ``atexit`` handlers run
  (JAX's ``clean_up``: its backends and ``jax.distributed.shutdown``; logging's flush); then
  stdout and stderr are flushed and ``os._exit`` skips the rest, the interpreter's teardown
  of the modules (JAX's, XLA's client), which writes nothing: the runs close what they
  write (``train_and_evaluate``'s TensorBoard events also when it fails). Ctrl-C while
  threads are joined exits with 130 (where Python would keep the status); a closed pipe on
  stdout (``| head``) with 120, as Python does."""
  try:
    threading._shutdown()  # pylint: disable=protected-access
  except KeyboardInterrupt:
    print("interrupted", file=sys.stderr)
    status = INTERRUPTED
  atexit._run_exitfuncs()  # pylint: disable=protected-access
  for stream in (sys.stdout, sys.stderr):
    try:
      stream.flush()
    except OSError:  # a closed pipe
      status = 120
    except ValueError:  # a stream the program closed: nothing to flush
      pass
  os._exit(status)


def prepare_process() -> None:
  """Step 1 of ``run``: XLA's flags into this process's environment, and the restart with
  glibc's malloc tunables when this is a ``python -m experiments...`` command, or ``python -m
  benchmarks``, which times the commands' steps in its own process (``benchmarks.job`` and
  ``benchmarks.startup`` time whole commands, started from the user's environment)."""
  from cnnjax import runtime  # light: no JAX
  changes = runtime.process_environment(os.environ)
  if "XLA_FLAGS" in changes:
    os.environ["XLA_FLAGS"] = changes["XLA_FLAGS"]
  if "GLIBC_TUNABLES" in changes and (_is_command() or _main_module() == "benchmarks"):
    sys.stdout.flush()
    sys.stderr.flush()
    argv = sys.orig_argv
    os.execve(sys.executable, [sys.executable, *argv[1:]], {**os.environ, **changes})


def fail(message: str) -> None:
  """The one error path: ``error: message`` on stderr, exit status 2."""
  print(f"error: {message}", file=sys.stderr)
  sys.exit(2)


def _not_orbax(record: std_logging.LogRecord) -> bool:
  """orbax logs a failed background write with its traceback, then raises it to the caller,
  which reports it in one line: its own copy is noise."""
  return "/orbax/" not in record.pathname


def _not_unretrieved(record: std_logging.LogRecord) -> bool:
  """The reads of a damaged checkpoint fail in several of orbax's tasks; the first is
  reported (and the checkpoint before restored), the others are dropped unawaited."""
  return "never retrieved" not in record.getMessage()


def _first_line(e: BaseException) -> str:
  lines = [line.strip() for line in str(e).replace("\\n", "\n").splitlines() if line.strip()]
  return lines[-1] if lines else type(e).__name__


def load_config_file(spec: str):
  """``get_config()`` of the file ``path`` or ``get_config(arg)`` of ``path:arg``, locked."""
  from cnnjax.errors import UserError
  path, colon, arg = spec.partition(":")
  if not pathlib.Path(path).is_file():
    raise UserError(f"config file {path} not found; expected a file such as "
                    "experiments/configs/cifar_bn.py")
  module_spec = importlib.util.spec_from_file_location("_config", path)
  module = importlib.util.module_from_spec(module_spec)
  try:
    module_spec.loader.exec_module(module)
    config = module.get_config(arg) if colon else module.get_config()
  except UserError as e:
    raise UserError(f"config file {spec}: {e}") from e
  except Exception as e:  # noqa: BLE001 - the file's own error, reported in one line
    raise UserError(f"config file {spec}: {_first_line(e)}") from e
  config.lock()
  return config


def _parse_value(text: str, current: Any, key: str) -> Any:
  from cnnjax.errors import UserError
  bad = UserError(f"bad value {text!r} for --config.{key} (current value {current!r}); expected "
                  f"{'a ' + type(current).__name__ if current is not None else 'a Python literal'}")
  if isinstance(current, bool):
    if text.lower() in ("true", "1", "yes"):
      return True
    if text.lower() in ("false", "0", "no"):
      return False
    raise bad
  if text == "None":
    return None
  if isinstance(current, int):
    try:
      return int(text)
    except ValueError:
      raise bad from None
  if isinstance(current, float):
    try:
      return float(text)
    except ValueError:
      raise bad from None
  if isinstance(current, (tuple, list)):
    try:
      value = ast.literal_eval(text) if text.strip() else ()
    except (ValueError, SyntaxError):
      value = tuple(t.strip() for t in text.split(","))
    return tuple(value) if isinstance(value, (tuple, list)) else (value,)
  if isinstance(current, str) or current is None:
    return text
  raise bad


def apply_override(config, key: str, text: str) -> None:
  """``config.<key> = text`` parsed as the key's type; a UserError names a bad key or value."""
  from cnnjax.errors import UserError
  node, parts = config, key.split(".")
  for i, part in enumerate(parts):
    if not hasattr(node, "keys") or part not in node:
      where = ".".join(parts[:i]) or "the config"
      valid = sorted(node.keys()) if hasattr(node, "keys") else []
      raise UserError(f"unknown config key {'.'.join(parts[:i + 1])!r}; keys in {where}: {valid}")
    if i < len(parts) - 1:
      node = node[part]
  value = _parse_value(text, node[parts[-1]], key)
  try:
    node[parts[-1]] = value
  except (TypeError, ValueError) as e:
    raise UserError(f"bad value {text!r} for --config.{key}: {_first_line(e)}") from e


def split_config_args(argv: Sequence[str]) -> tuple[list[str], str | None, list[tuple[str, str]]]:
  """``argv`` without its ``--config`` arguments, the config spec and the overrides."""
  from cnnjax.errors import UserError
  rest, spec, overrides = [], None, []
  i = 0
  while i < len(argv):
    arg = argv[i]
    name = arg[2:].split("=", 1)[0] if arg.startswith("--") else None
    if name == "config" or (name or "").startswith("config."):
      if "=" in arg:
        value = arg.split("=", 1)[1]
      elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
        i += 1
        value = argv[i]
      else:
        raise UserError(f"missing value for flag --{name}")
      if name == "config":
        spec = value
      else:
        overrides.append((name[len("config."):], value))
    else:
      rest.append(arg)
    i += 1
  return rest, spec, overrides


def help_text(doc: str, fv: flags.FlagValues, config) -> str:
  """``--help``: the command's docstring, its flags, and the config keys."""
  lines = [doc.strip(), "", "Flags:"]
  for name in sorted(fv):
    lines.append(f"  --{name} (default {fv[name].default!r}): {fv[name].help}")
  if config is not None:
    from cnnjax import config as config_lib
    lines += ["", "Config keys (--config.KEY=VALUE; values of the given --config, else the defaults):"]
    for key, value in config_lib.flat(config).items():
      lines.append(f"  {key} = {value!r}: {config_lib.DOCS.get(key, 'an option of the model')}")
  return "\n".join(lines)


def run(main: Callable[..., Any], *, doc: str, fv: flags.FlagValues, config: bool = False,
        required: Sequence[str] = (), argv: Sequence[str] | None = None) -> None:
  """Runs a command's ``main`` (see the module docstring); never returns.

  Args:
    main: ``main(config)`` when ``config``, else ``main()``; reads its absl flags; returns
      an exit status (None: 0).
    doc: the command's docstring (``--help``).
    fv: the command's flags (``command_flags``; with the multi-process flags, the command
      starts ``jax.distributed``).
    config: whether the command takes ``--config``.
    required: absl flags that must be given (``--config`` is, when ``config``).
    argv: the command line, program name first (default ``sys.argv``). With the default, in
      a ``python -m experiments.<command>`` process, the process ends in ``end_process``
      (callers' ``finally`` blocks do not run); a given ``argv`` ends in ``SystemExit``.
  """
  prepare_process()
  from cnnjax.errors import UserError
  argv_given = argv
  argv = list(sys.argv if argv is None else argv)
  fv.unparse_flags()  # a second run in one process starts from the defaults
  try:
    rest, spec, overrides = split_config_args(argv[1:]) if config else (argv[1:], None, [])
    if any(a in ("--help", "-h", "--helpfull", "-?") for a in rest):
      from cnnjax import config as config_lib
      shown = (load_config_file(spec) if spec else config_lib.default_config()) if config else None
      print(help_text(doc, fv, shown))
      sys.exit(0)
    try:
      positional = fv([argv[0], *rest])[1:]
    except flags.Error as e:
      raise UserError(_first_line(e)) from e
    if positional:
      raise UserError(f"unexpected arguments {positional}; expected only --flags (see --help)")
    missing = [f"--{name}" for name in required if fv[name].value is None]
    if config and spec is None:
      missing.insert(0, "--config")
    if missing:
      raise UserError(f"missing {', '.join(missing)} (see --help)")
    cfg = None
    if config:
      cfg = load_config_file(spec)
      for key, value in overrides:
        apply_override(cfg, key, value)
      from cnnjax.data import sources
      sources.read_ahead(cfg.data.source, cfg.data.limit)  # while JAX imports
    logging.set_verbosity(logging.WARNING)
    logging.get_absl_logger().addFilter(_not_orbax)  # once: addFilter skips a filter it has
    std_logging.getLogger("asyncio").addFilter(_not_unretrieved)
    from cnnjax import parallel, runtime
    if "coordinator_address" in fv:
      parallel.initialize_distributed(*(fv[name].value for name in _MULTIHOST_FLAGS))
    runtime.configure()
    status = main(cfg) if config else main()
  except Exception as e:
    from cnnjax import workdir
    if workdir.is_disk_full(e):  # the checkpoints before are intact: a rerun resumes
      message = str(e) if isinstance(e, UserError) else f"no space left on the device: {_first_line(e)}"
      print(f"error: {message}", file=sys.stderr, flush=True)
      sys.stdout.flush()
      os._exit(2)  # orbax's writer threads would print their failures again at exit
    if isinstance(e, UserError):
      fail(str(e))
    raise
  except KeyboardInterrupt:
    print("interrupted", file=sys.stderr)
    sys.exit(INTERRUPTED)
  if argv_given is None and _is_command():
    end_process(status or 0)
  sys.exit(status or 0)
