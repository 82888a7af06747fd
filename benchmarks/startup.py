r"""Start-up of a run: seconds from the command to its header, its "Ready" line, its first
training step done (compile included) and its first epoch's line (12 steps of runlocal,
validation, checkpoint, curves), with JAX's compilation cache empty (cold) and filled (warm).

  python -m benchmarks.startup --source ../shared/data/cifar10.npz [--repeats 3] [--out BENCHMARKS.md]

Each run is ``python -m experiments.train --config experiments/configs/runlocal.py`` in a
fresh workdir; cold runs get a fresh ``JAX_COMPILATION_CACHE_DIR``, warm runs share one filled
by a first run that is not counted. Also timed: importing what a run imports
(``cnnjax.train``) in a fresh process. Medians of ``--repeats`` runs each. Run it alone.
"""
import datetime
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time

from absl import flags

from experiments import entry

FLAGS = entry.command_flags()
_SOURCE = flags.DEFINE_string("source", None, "runlocal's data: a CIFAR-shaped .npz",
                              flag_values=FLAGS)
_REPEATS = flags.DEFINE_integer("repeats", 3, "runs of each kind", lower_bound=1, flag_values=FLAGS)
_OUT = flags.DEFINE_string("out", None, "markdown file the report is appended to", flag_values=FLAGS)
MARKS = {"header": "Data: ", "ready": "Ready to train", "first step": "First step done",
         "epoch 1": "Epoch 1/"}


def _timed_run(source: str, cache: str) -> dict[str, float]:
  """Seconds from the start to each of ``MARKS`` and to the exit of one runlocal run."""
  with tempfile.TemporaryDirectory() as workdir:
    cmd = [sys.executable, "-m", "experiments.train", "--config",
           "experiments/configs/runlocal.py", "--workdir", workdir,
           f"--config.data.source={source}"]
    start, seen = time.perf_counter(), {}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "JAX_COMPILATION_CACHE_DIR": cache})
    for line in proc.stdout:
      for name, mark in MARKS.items():
        if line.startswith(mark) and name not in seen:
          seen[name] = time.perf_counter() - start
    if proc.wait():
      raise SystemExit(f"error: {shlex.join(cmd)} exited with {proc.returncode}")
    return {**seen, "exit": time.perf_counter() - start}


def _import_seconds() -> float:
  start = time.perf_counter()
  subprocess.run([sys.executable, "-c", "import cnnjax.train"], check=True)
  return time.perf_counter() - start


def main() -> None:
  from cnnjax import logs
  source = os.path.abspath(os.path.expanduser(_SOURCE.value))
  rows = {"cold": [], "warm": []}
  with tempfile.TemporaryDirectory() as warm:
    _timed_run(source, warm)  # fills the warm cache
    for _ in range(_REPEATS.value):
      with tempfile.TemporaryDirectory() as cold:
        rows["cold"].append(_timed_run(source, cold))
      rows["warm"].append(_timed_run(source, warm))
  imports = statistics.median(_import_seconds() for _ in range(_REPEATS.value))
  info = logs.run_info()
  lines = [f"## Start-up of runlocal: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC", "",
           f"`python -m benchmarks.startup --source {_SOURCE.value} --repeats {_REPEATS.value}`; "
           f"{info['cpu']}, {info['cpu_count']} cores; jax {info['packages']['jax']}, "
           f"flax {info['packages']['flax']}. Seconds from the command (medians of "
           f"{_REPEATS.value}):", "",
           "| cache | header | ready | first step | epoch 1 (12 steps, validation, checkpoint, "
           "curves) | exit |", "|---|---|---|---|---|---|"]
  for kind, runs in rows.items():
    med = {k: statistics.median(r[k] for r in runs) for k in (*MARKS, "exit")}
    lines.append(f"| {kind} | {med['header']:.2f} | {med['ready']:.2f} | "
                 f"{med['first step']:.2f} | {med['epoch 1']:.2f} | {med['exit']:.2f} |")
  lines += ["", f"Importing `cnnjax.train` in a fresh process: {imports:.2f} s.", ""]
  report = "\n".join(lines)
  print(report)
  if _OUT.value:
    with open(_OUT.value, "a") as f:
      f.write("\n" + report)


if __name__ == "__main__":
  entry.run(main, doc=__doc__, fv=FLAGS, required=["source"])
