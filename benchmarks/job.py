r"""The whole job, from the command to test accuracy: the ``cifar_bn_fast`` recipe in cnnjax
against the same recipe in plain PyTorch (``benchmarks.torch_job``), float32 against float32
and bfloat16 against bf16 autocast, alternating, in one run.

  python -m benchmarks.job --data ../shared/data/cifar10.npz [--epochs 1] [--pairs 3] \
      [--out BENCHMARKS.md]

Each run is a fresh process timed from launch to exit: ``python -m experiments.train --config
experiments/configs/cifar_bn_fast.py --config.init=torch`` (the peer's initialisation: the
same recipe, so the same accuracy) in a new workdir (``--config.precision=bfloat16`` for
bf16) with an empty JAX compilation cache (every run compiles, as a first run does;
``--cache=warm``: one cache shared by the runs, filled by an untimed run of each precision
first, as a rerun of the same study finds it), and ``python -m benchmarks.torch_job``.
cnnjax's time is split at its log lines: start-up (imports, data, model, until "Ready to
train"), training (the epochs, the first step's compile included), evaluation (to the "Test"
line) and writing (pictures, checkpoints, TensorBoard, to the exit).
bf16 rows run only where this machine computes bf16 (``cnnjax.runtime.compute_dtype``), the
PyTorch rows only where torch is importable. A run during which other processes used >=
``--quiet_cores`` cores is marked busy. Run it alone.
"""
import contextlib
import datetime
import functools
import importlib.util
import json
import os
import pathlib
import re
import statistics
import subprocess
import sys
import tempfile
import time

from absl import flags

from benchmarks import harness
from experiments import entry

FLAGS = entry.command_flags()
_DATA = flags.DEFINE_string("data", None, "CIFAR-10 .npz (x_train, y_train, x_test, y_test)",
                            flag_values=FLAGS)
_EPOCHS = flags.DEFINE_integer("epochs", 1, "epochs of each run", lower_bound=1,
                               flag_values=FLAGS)
_PAIRS = flags.DEFINE_integer("pairs", 1, "rounds of the alternating runs", lower_bound=1,
                              flag_values=FLAGS)
_QUIET = flags.DEFINE_float("quiet_cores", 0.1, "a run is busy when other processes used this "
                            "many cores during it", lower_bound=0, flag_values=FLAGS)
_CACHE = flags.DEFINE_enum("cache", "cold", ["cold", "warm"], "cnnjax's JAX compilation "
                           "cache: empty in each run (cold) or filled by an untimed run first "
                           "(warm)", flag_values=FLAGS)
_OUT = flags.DEFINE_string("out", None, "markdown file the report is appended to",
                           flag_values=FLAGS)
CONFIG = pathlib.Path(__file__).resolve().parent.parent / "experiments/configs/cifar_bn_fast.py"
TEMPORARY = "cnnjax-job-"  # the prefix of the workdirs and caches (all removed)
PHASES = {"ready": re.compile(r"^Ready to train"), "trained": re.compile(r"^Epoch \d+/\d+ \|"),
          "tested": re.compile(r"^Test \|")}


def _timed(cmd: list[str], env: dict[str, str] | None = None
           ) -> tuple[float, dict[str, float], list[str], float]:
  """``(wall, phase -> seconds since launch of its last matching line, output, other
  processes' cores)`` of running ``cmd`` with ``env`` added to the environment."""
  ticks0, start = harness.cpu_ticks(), time.perf_counter()
  proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          env={**os.environ, **(env or {})})
  marks, lines = {}, []
  for line in proc.stdout:
    lines.append(line.rstrip())
    for name, pattern in PHASES.items():
      if pattern.match(line):
        marks[name] = time.perf_counter() - start
  wall = time.perf_counter() - start
  ticks1 = harness.cpu_ticks()
  if proc.wait():
    sys.exit(f"error: {' '.join(cmd)} exited with {proc.returncode}:\n" + "\n".join(lines[-15:]))
  others = ((ticks1[0] - ticks0[0]) - (ticks1[1] - ticks0[1])) / os.sysconf("SC_CLK_TCK") / wall
  return wall, marks, lines, max(others, 0.0)


def cnnjax_run(data: str, epochs: int, precision: str, seed: int, cache: str | None = None
               ) -> dict:
  """One timed run; ``cache``: the JAX compilation cache's directory (None: a new, empty
  one)."""
  with (tempfile.TemporaryDirectory(prefix=TEMPORARY) as workdir,
        contextlib.nullcontext(cache) if cache else tempfile.TemporaryDirectory(
            prefix=TEMPORARY) as cache):
    wall, marks, _, others = _timed(
        [sys.executable, "-m", "experiments.train", "--config", str(CONFIG), "--workdir", workdir,
         f"--config.data.source={data}", f"--config.num_epochs={epochs}",
         f"--config.precision={precision}", f"--config.seed={seed}", "--config.init=torch"],
        {"JAX_COMPILATION_CACHE_DIR": cache})
    metrics = json.loads(open(os.path.join(workdir, "test_metrics.json")).read())
  phases = {"start-up": marks["ready"], "training": marks["trained"] - marks["ready"],
            "evaluation": marks["tested"] - marks["trained"], "writing": wall - marks["tested"]}
  return {"wall": wall, "phases": phases, "others": others, "accuracy": metrics["accuracy"],
          "lossless": metrics.get("accuracy_lossless")}


def torch_run(data: str, epochs: int, bf16: bool, seed: int) -> dict:
  wall, _, lines, others = _timed(
      [sys.executable, "-m", "benchmarks.torch_job", "--data", data, f"--epochs={epochs}",
       f"--seed={seed}", *(["--bf16"] if bf16 else [])])
  result = json.loads(lines[-1])
  phases = {"start-up": result["startup_s"], "training": result["train_s"],
            "evaluation": result["eval_s"]}
  return {"wall": wall, "phases": phases, "others": others, "accuracy": result["accuracy"],
          "lossless": result.get("accuracy_lossless")}


def arithmetic(runs: dict[str, list[dict]], data: str) -> list[str]:
  """What the training phases sustained against this machine's peak (benchmarks/roofline.py),
  measured after the runs, in this process."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  from benchmarks import roofline  # pylint: disable=import-outside-toplevel
  from cnnjax import runtime  # pylint: disable=import-outside-toplevel
  from cnnjax.models import model_from_config  # pylint: disable=import-outside-toplevel
  config = entry.load_config_file(str(CONFIG))
  runtime.configure()
  peaks = {"f32": roofline.peak_tflops("float32"), "bf16": roofline.peak_tflops("bfloat16")}
  gflops = roofline.train_gflops(model_from_config(config.model), (32, 32, 3))
  with np.load(data) as arrays:
    images = len(arrays["y_train"]) // config.batch_size * config.batch_size * _EPOCHS.value
  tflop = gflops * images / 1e3
  sustained = ", ".join(
      f"{name} " + roofline.percent(tflop / statistics.median(r["phases"]["training"] for r in rs),
                                    peaks[name.split()[1]])
      for name, rs in runs.items())
  floors = ", ".join(f"{tflop / peak:.0f} s in {short}" for short, peak in peaks.items() if peak)
  return [f"- Arithmetic (benchmarks/roofline.py): the model trains with {gflops:.4g} GFLOP "
          f"per image (XLA's count), {tflop:.1f} TFLOP over these {images:,} images; this "
          "machine's peak (a 4096x1024x1024 product through cnnjax.onednn) is "
          + (", ".join(f"{short} {peak:.3f}" for short, peak in peaks.items() if peak)
             or "not measured (no oneDNN here)")
          + (f" TFLOP/s, so at that peak the training phase would take no less than {floors}"
             if floors else "")
          + f". Training phases sustained (cnnjax's with its compile): {sustained}."]


def measure(data: str, precisions: list[str], with_torch: bool, cache: str | None
            ) -> dict[str, list[dict]]:
  """Each variant's runs (``cnnjax_run``, ``torch_run``), alternating, ``--pairs`` rounds;
  ``cache``: cnnjax's shared compilation cache, filled first by an untimed run per precision
  (None: an empty one in each run)."""
  variants = {}
  for precision in precisions:
    short = "f32" if precision == "float32" else "bf16"
    variants[f"cnnjax {short}"] = functools.partial(cnnjax_run, data, _EPOCHS.value, precision,
                                                    cache=cache)
    if cache:
      harness.progress(f"filling the compilation cache: cnnjax {short}, untimed")
      before = set(os.listdir(cache))
      cnnjax_run(data, _EPOCHS.value, precision, 0, cache)
      if set(os.listdir(cache)) <= before:
        sys.exit(f"error: the untimed cnnjax {short} run added nothing to its compilation cache "
                 f"{cache}: JAX did not write it (cache options in cnnjax.runtime.configure)")
    if with_torch:
      variants[f"torch {short}"] = functools.partial(torch_run, data, _EPOCHS.value,
                                                     precision == "bfloat16")
  runs = {name: [] for name in variants}
  for pair in range(_PAIRS.value):
    for name, run in variants.items():
      runs[name].append(run(pair))
      r = runs[name][-1]
      harness.progress(f"{name} seed {pair}: {r['wall']:.1f} s, {100 * r['accuracy']:.1f}% "
                       f"({', '.join(f'{k} {v:.1f}' for k, v in r['phases'].items())}; "
                       f"others {r['others']:.2f} cores)")
  return runs


def main() -> None:
  from cnnjax import logs, runtime
  data = os.path.abspath(os.path.expanduser(_DATA.value))
  with_torch = importlib.util.find_spec("torch") is not None
  precisions = ["float32"] + ["bfloat16"] * (runtime.compute_dtype("bfloat16")[0] == "bfloat16")
  warm = _CACHE.value == "warm"
  with (tempfile.TemporaryDirectory(prefix=TEMPORARY) if warm
        else contextlib.nullcontext()) as cache:  # removed on any exit
    runs = measure(data, precisions, with_torch, cache)
  info, m = logs.run_info(), harness.machine(with_torch)
  compiled = ("a JAX compilation cache filled by an untimed run (as a rerun of the study finds "
              "it)" if warm else "an empty JAX compilation cache (as a first run)")
  lines = [f"## The whole job, cifar_bn_fast: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC",
           "", f"`python -m benchmarks.job --data {_DATA.value} --epochs {_EPOCHS.value} "
           f"--pairs {_PAIRS.value}{' --cache=warm' if warm else ''}`", "",
           f"- Machine: {m['machine']}",
           f"- Versions: {m['versions']}", f"- cnnjax kernels: {m['kernels']}",
           f"- Method: {_EPOCHS.value} epoch(s) of the cifar_bn_fast recipe on all 50k images "
           f"(cnnjax with PyTorch's initialisation, `--config.init=torch`, as its peer), "
           f"then the 10k test images with test-time flips; each run a fresh process timed from "
           f"launch to exit, cnnjax's with {compiled}; the variants alternate, "
           f"{_PAIRS.value} round(s), seeds 0..{_PAIRS.value - 1}; medians. A run is busy when "
           f"other processes used >= {_QUIET.value:g} cores during it.", "",
           "| variant | wall s (each run) | start-up | training | evaluation | writing "
           "| test acc (lossless 1k) | busy runs |", "|---|---|---|---|---|---|---|---|"]
  for name, rs in runs.items():
    med = lambda k: statistics.median(r["phases"].get(k, 0.0) for r in rs)  # noqa: E731
    walls = ", ".join(f"{r['wall']:.0f}" for r in rs)
    acc = statistics.mean(r["accuracy"] for r in rs)
    lossless = (f" ({100 * statistics.mean(r['lossless'] for r in rs):.1f}%)"
                if rs[0]["lossless"] is not None else "")
    busy = sum(r["others"] >= _QUIET.value for r in rs)
    lines.append(f"| {name} | {statistics.median(r['wall'] for r in rs):.1f} ({walls}) | "
                 f"{med('start-up'):.1f} | {med('training'):.1f} | {med('evaluation'):.1f} | "
                 f"{med('writing'):.1f} | {100 * acc:.1f}%{lossless} | {busy} of {len(rs)} |")
  lines.append("")
  for precision in ("f32", "bf16"):
    ours, peer = runs.get(f"cnnjax {precision}"), runs.get(f"torch {precision}")
    if ours and peer:
      ratio = (statistics.median(r["wall"] for r in peer)
               / statistics.median(r["wall"] for r in ours))
      lines.append(f"- {precision}: cnnjax is {ratio:.2f}x as fast as PyTorch, wall time "
                   "(>1: cnnjax faster).")
  lines += arithmetic(runs, data)
  if not with_torch:
    lines.append("- PyTorch not importable: cnnjax figures only.")
  lines += [f"- jax {info['packages']['jax']}; PyTorch's start-up and training are timed "
            "inside its process (its writing is nil: it saves nothing).", "", ""]
  report = "\n".join(lines)
  print(report)
  if _OUT.value:
    with open(_OUT.value, "a") as f:
      f.write(report)


if __name__ == "__main__":
  entry.run(main, doc=__doc__, fv=FLAGS, required=["data"])
