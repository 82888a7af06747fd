r"""Throughput benchmarks on this machine, printed and appended to BENCHMARKS.md.

  python -m experiments.bench --input [--source ../shared/data/cifar10.npz]
      [--folder ../shared/data/hymenoptera/train] [--workers 2] [--windows 7]
      [--window_seconds 3] [--out BENCHMARKS.md]

``--input`` measures the training input pipelines (``cnnjax.data.pipeline``), in-process
and with ``--workers`` worker processes: CIFAR-10 with crop (pad 4) + flip at each of
``--batch_sizes``, the Keras ``ImageDataGenerator`` set (rotation 40, shifts 0.2, shear
0.2, zoom 0.2, flip, nearest fill), and an image folder decoded per record with a random
resized crop to 224 + flip. In the same run it measures what the ``--step_model`` (BN CNN)
train step consumes (synthetic batches, at each of ``--batch_sizes``) and prints the ratio
pipeline / train step, whose target is >= 3.

Every figure is the median of steady-state windows after a warm-up. The CPU time that
other processes (all but this one and its workers) used during each window is read from
/proc; a window is kept only when they used less than ``--quiet_cores`` cores. When no
window of a row was quiet, the row shows the median of all windows and is marked busy:
such a figure is a lower bound, not a measurement of this code.
"""
import argparse
import dataclasses
import datetime
import importlib.metadata
import os
import platform
import statistics
import sys
import time
from typing import Callable, Iterator

import cnnjax  # noqa: F401  (XLA CPU defaults before JAX starts)
import jax
import numpy as np
import optax
from cnnjax import train
from cnnjax.data import folders, pipeline, sources
from cnnjax.data.augment import KerasAugment
from cnnjax.errors import UserError
from cnnjax.models import create_model

KERAS_AUGMENT = {"rotation": 40.0, "width_shift": 0.2, "height_shift": 0.2, "shear": 0.2,
                 "zoom": 0.2, "horizontal_flip": True, "fill_mode": "nearest"}
PIPELINE_TARGET = 3.0  # the train pipeline must deliver >= 3x what the train step consumes


@dataclasses.dataclass
class Measurement:
  """One row: items (images) per second over windows, with the other processes' load.

  Attributes:
    name: what was measured.
    batch_size: images per batch.
    workers: worker processes of the input pipeline (0: in-process); None for a train step.
    rates: images/second of each window.
    others: cores used by other processes during each window.
    quiet_cores: a window is kept when ``others`` < this.
    first_batch_seconds: time to the first batch (pipeline start, e.g. spawning workers).
  """
  name: str
  batch_size: int
  workers: int | None
  rates: list[float]
  others: list[float]
  quiet_cores: float
  first_batch_seconds: float | None = None

  @property
  def kept(self) -> list[float]:
    return [r for r, o in zip(self.rates, self.others) if o < self.quiet_cores]

  @property
  def busy(self) -> bool:
    """True when no window was quiet: the figure is then the median of all windows."""
    return not self.kept

  @property
  def images_per_second(self) -> float:
    return statistics.median(self.kept or self.rates)


def _cpu_ticks() -> tuple[int, int]:
  """``(busy ticks of the whole machine, ticks of this process and its descendants)``."""
  with open("/proc/stat") as f:
    fields = [int(v) for v in f.readline().split()[1:9]]
  user, nice, system, _, _, irq, softirq, steal = fields  # idle and iowait left out
  machine = user + nice + system + irq + softirq + steal
  parent, ticks = {}, {}
  for entry in os.scandir("/proc"):
    if not entry.name.isdigit():
      continue
    try:
      with open(f"/proc/{entry.name}/stat") as f:
        stat = f.read()
    except OSError:  # the process ended while scanning
      continue
    rest = stat[stat.rindex(")") + 2:].split()  # fields after "pid (comm) "
    pid = int(entry.name)
    parent[pid] = int(rest[1])
    ticks[pid] = int(rest[11]) + int(rest[12])  # utime + stime
  ours, frontier = set(), {os.getpid()}
  while frontier:
    ours |= frontier
    frontier = {p for p, pp in parent.items() if pp in frontier and p not in ours}
  return machine, sum(ticks.get(p, 0) for p in ours)


def measure(step: Callable[[], int], sync: Callable[[], None], windows: int,
            window_seconds: float, warmup_seconds: float) -> tuple[list[float], list[float]]:
  """Runs ``step`` (returning the images it did) in timed windows after a warm-up.

  Args:
    step: does one unit of work and returns its number of images.
    sync: waits for asynchronous work (a dispatched train step) to finish.
    windows: number of windows.
    window_seconds: length of each window (it ends after the step that crosses it).
    warmup_seconds: untimed work first (compilation, filling prefetch buffers).
  Returns:
    ``(rates, others)``: images/second and the cores other processes used, per window.
  """
  hz = os.sysconf("SC_CLK_TCK")
  start = time.perf_counter()
  while time.perf_counter() - start < warmup_seconds:
    step()
  sync()
  rates, others = [], []
  for _ in range(windows):
    machine0, ours0 = _cpu_ticks()
    start, images = time.perf_counter(), 0
    while time.perf_counter() - start < window_seconds:
      images += step()
    sync()
    seconds = time.perf_counter() - start
    machine1, ours1 = _cpu_ticks()
    rates.append(images / seconds)
    others.append(max(0.0, (machine1 - machine0) - (ours1 - ours0)) / hz / seconds)
  return rates, others


def _pipeline_row(name: str, ds, batch_size: int, workers: int,
                  args: argparse.Namespace) -> Measurement:
  """Images/second delivered by ``prefetch(ds.repeat(), workers)``."""
  start = time.perf_counter()
  batches = pipeline.prefetch(ds.repeat(), workers=workers)
  next(batches)
  first = time.perf_counter() - start
  rates, others = measure(lambda: len(next(batches)["label"]), lambda: None, args.windows,
                          args.window_seconds, args.warmup_seconds)
  batches.close()
  return Measurement(name, batch_size, workers, rates, others, args.quiet_cores, first)


def _train_step_row(batch_size: int, args: argparse.Namespace) -> Measurement:
  """Images/second the ``--step_model`` train step consumes (Adam, synthetic CIFAR-shaped
  batches), as ``cnnjax.train.Runner`` runs it."""
  runner = train.Runner.create(train.make_normalize(np.full(3, 127.0), np.full(3, 64.0)))
  state = runner.put_state(train.create_train_state(
      create_model(args.step_model, num_classes=10), optax.adam(1e-3), (32, 32, 3), seed=0))
  rng = np.random.default_rng(0)
  batch = runner.to_global({"image": rng.integers(0, 256, (batch_size, 32, 32, 3), np.uint8),
                            "label": rng.integers(0, 10, batch_size)})
  held = {"state": state, "sums": None}

  def step() -> int:
    previous = held["sums"]
    held["state"], held["sums"] = runner.train_step(held["state"], batch)
    if previous is not None:  # one step in flight, as in the training loop
      jax.block_until_ready(previous)
    return batch_size

  rates, others = measure(step, lambda: jax.block_until_ready(held["state"]), args.windows,
                          args.window_seconds, args.warmup_seconds)
  return Measurement(f"{args.step_model} train step (synthetic)", batch_size, None, rates,
                     others, args.quiet_cores)


def input_rows(args: argparse.Namespace) -> Iterator[Measurement]:
  """The ``--input`` rows, measured one after the other."""
  train_data = sources.load(args.source).train
  folder = folders.ImageFolder(args.folder)
  workers = [0] + ([args.workers] if args.workers else [])
  crop_flip = KerasAugment(crop_padding=4, horizontal_flip=True)
  largest = max(args.batch_sizes)
  for b in args.batch_sizes:
    for w in workers if b == largest else [0]:
      yield _pipeline_row("CIFAR-10 crop + flip", pipeline.train_epoch(train_data, b, 0, 0, crop_flip),
                          b, w, args)
  for w in workers:
    yield _pipeline_row("CIFAR-10 Keras set", pipeline.train_epoch(
        train_data, largest, 0, 0, KerasAugment(**KERAS_AUGMENT)), largest, w, args)
  flip = KerasAugment(horizontal_flip=True)
  name = "/".join(folder.root.resolve().parts[-2:])
  for w in workers:
    ds = pipeline.folder_epoch(folder, args.folder_batch_size, 0, 0, 224, flip)
    yield _pipeline_row(f"{name} decode + resized crop 224 + flip", ds,
                        args.folder_batch_size, w, args)
  for b in args.batch_sizes:
    yield _train_step_row(b, args)


def ratios(rows: list[Measurement]) -> list[str]:
  """``pipeline / train step`` at each batch size measured for both (target >= 3x)."""
  lines = []
  steps = {r.batch_size: r for r in rows if r.workers is None}
  for r in rows:
    if r.name == "CIFAR-10 crop + flip" and r.workers == 0 and r.batch_size in steps:
      step = steps[r.batch_size]
      ratio = r.images_per_second / step.images_per_second
      verdict = "meets" if ratio >= PIPELINE_TARGET else "MISSES"
      busy = " (busy windows)" if r.busy or step.busy else ""
      lines.append(f"batch {r.batch_size}: CIFAR-10 crop + flip pipeline / {step.name} = "
                   f"{r.images_per_second:,.0f} / {step.images_per_second:,.0f} = {ratio:.1f}x, "
                   f"{verdict} the >= {PIPELINE_TARGET:.0f}x target{busy}")
  return lines


def machine() -> dict[str, str]:
  """The CPU, its cores and the versions that matter for the figures."""
  model = "unknown CPU"
  with open("/proc/cpuinfo") as f:
    for line in f:
      if line.startswith("model name"):
        model = line.split(":", 1)[1].strip()
        break
  versions = {"python": platform.python_version(), "jax": jax.__version__}
  versions.update({p: importlib.metadata.version(p) for p in ("flax", "grain", "numpy", "pillow")})
  return {"cpu": f"{model}, {os.cpu_count()} cores ({len(os.sched_getaffinity(0))} usable)",
          "versions": ", ".join(f"{k} {v}" for k, v in versions.items()),
          "xla_flags": os.environ.get("XLA_FLAGS", "")}


def format_row(r: Measurement) -> str:
  """A markdown table row of ``r``."""
  workers = "-" if r.workers is None else ("in-process" if r.workers == 0 else str(r.workers))
  kept = f"{len(r.kept)}/{len(r.rates)}" + (" busy: all windows" if r.busy else "")
  first = "-" if r.first_batch_seconds is None else f"{r.first_batch_seconds:.2f}"
  others = f"{min(r.others):.2f}-{max(r.others):.2f}"
  return (f"| {r.name} | {r.batch_size} | {workers} | {r.images_per_second:,.0f} | {kept} | "
          f"{others} | {first} |")


def report(title: str, command: str, rows: list[Measurement], notes: list[str],
           args: argparse.Namespace) -> str:
  """The markdown section for BENCHMARKS.md: command, machine, versions, method, table."""
  m = machine()
  windows = sum(len(r.rates) for r in rows)
  quiet = sum(len(r.kept) for r in rows)
  busy_cores = statistics.median(o for r in rows for o in r.others)
  if quiet == windows:
    state = "The machine was quiet: every window was kept."
  else:
    state = (f"**The machine was not quiet**: {windows - quiet} of {windows} windows had other "
             f"processes using >= {args.quiet_cores} cores (median {busy_cores:.2f} cores over "
             f"all windows) and were discarded; rows marked busy had no quiet window and show "
             f"the median of all their windows, a lower bound to re-run on a quiet machine.")
  lines = [
      f"## {title}: {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}", "",
      f"`{command}`", "",
      f"- Machine: {m['cpu']}", f"- Versions: {m['versions']}",
      f"- XLA_FLAGS: `{m['xla_flags']}`",
      f"- Method: median images/s over {args.windows} windows of {args.window_seconds:g} s "
      f"after {args.warmup_seconds:g} s of warm-up; a window is kept when other processes "
      f"used < {args.quiet_cores:g} cores during it (from /proc).",
      f"- {state}", "",
      "| benchmark | batch | workers | images/s | windows kept | other processes (cores) "
      "| first batch (s) |",
      "|---|---|---|---|---|---|---|",
      *map(format_row, rows), "", *(f"- {n}" for n in notes), "", ""]
  return "\n".join(lines)


def _batch_sizes(text: str) -> list[int]:
  try:
    sizes = [int(v) for v in text.split(",")]
  except ValueError:
    sizes = []
  if not sizes or min(sizes) < 1:
    raise argparse.ArgumentTypeError(f"{text!r}; expected positive integers separated by commas")
  return sizes


def parse_args(argv: list[str]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(prog="python -m experiments.bench", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  mode = parser.add_mutually_exclusive_group(required=True)
  mode.add_argument("--input", action="store_true",
                    help="input pipelines vs the BN CNN train step")
  parser.add_argument("--source", default="../shared/data/cifar10.npz",
                      help="CIFAR-10 data for cnnjax.data.sources.load (.npz, idx folder, TFDS name)")
  parser.add_argument("--folder", default="../shared/data/hymenoptera/train",
                      help="an image folder root/<class>/<image>")
  parser.add_argument("--folder_batch_size", type=int, default=32)
  parser.add_argument("--step_model", default="bn_cnn",
                      help="the model (cnnjax.models.create_model) whose train step the input must outpace")
  parser.add_argument("--batch_sizes", type=_batch_sizes, default=[32, 128],
                      help="CIFAR-10 pipeline and train-step batch sizes, e.g. 32,128")
  parser.add_argument("--workers", type=int, default=2,
                      help="worker processes for the second measurement of each pipeline (0: none)")
  parser.add_argument("--windows", type=int, default=7)
  parser.add_argument("--window_seconds", type=float, default=3.0)
  parser.add_argument("--warmup_seconds", type=float, default=3.0)
  parser.add_argument("--quiet_cores", type=float, default=0.1,
                      help="keep a window when other processes used fewer cores than this")
  parser.add_argument("--out", default="BENCHMARKS.md", help="markdown file the results are appended to")
  return parser.parse_args(argv)


def main(argv: list[str]) -> None:
  """Runs the chosen mode, prints each row as it is measured, appends the report to --out."""
  args = parse_args(argv)
  m = machine()
  print(f"{m['cpu']}; {m['versions']}", flush=True)
  if args.input:
    title, measured = f"Input pipelines vs the {args.step_model} train step", input_rows(args)
  rows = []
  for row in measured:
    rows.append(row)
    print(format_row(row), flush=True)
  notes = ratios(rows)
  print("\n".join(notes), flush=True)
  command = "python -m experiments.bench " + " ".join(argv)
  with open(args.out, "a") as f:
    f.write(report(title, command, rows, notes, args))
  print(f"appended to {args.out}", flush=True)


if __name__ == "__main__":
  try:
    main(sys.argv[1:])
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
