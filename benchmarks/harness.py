"""Timing windows on a shared machine, and the markdown report of a run.

Every figure is the median of steady-state windows after a warm-up. The CPU time that other
processes (all but this one and its descendants, e.g. pipeline workers) used during each
window is read from /proc; a window is kept only when they used fewer than
``Windows.quiet_cores`` cores. When no window of a row was quiet, the row shows the median
of all windows and is marked busy: such a figure is a lower bound, not a measurement of
this code.

The PyTorch peers are measured in a process of their own (``peer_process``): in a process
that had run cnnjax's steps, PyTorch's BNCNN step ran 20-25% slower (BENCHMARKS.md). That
process imports this module for ``measure``, so JAX and cnnjax are imported where used.
"""
import dataclasses
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
from importlib import metadata
from typing import Any, Callable

# Versions that matter for the figures beyond those of ``logs.run_info``.
PACKAGES = ("pillow", "onednn-cpu-gomp")
TORCH_PACKAGES = ("torch", "torchvision", "efficientnet-lite-pytorch")


@dataclasses.dataclass(frozen=True)
class Windows:
  """How each row is timed: ``count`` windows of ``seconds`` after ``warmup_seconds`` of
  untimed work; a window is kept when other processes used fewer than ``quiet_cores``."""
  count: int
  seconds: float
  warmup_seconds: float
  quiet_cores: float


@dataclasses.dataclass
class Measurement:
  """One row: items (images) per second over windows, with the other processes' load.

  Attributes:
    name: what was measured.
    batch_size: images per batch.
    workers: worker processes of the input pipeline (0: in-process); None for a step.
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


def cpu_ticks() -> tuple[int, int]:
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


def measure(step: Callable[[], int], sync: Callable[[], None],
            windows: Windows) -> tuple[list[float], list[float]]:
  """Runs ``step`` (one unit of work, returning its number of images) in timed windows
  after the warm-up; ``sync`` waits for asynchronous work (a dispatched step) to finish.
  A window ends after the step that crosses its length.

  Returns:
    ``(rates, others)``: images/second and the cores other processes used, per window.
  """
  hz = os.sysconf("SC_CLK_TCK")
  start = time.perf_counter()
  while time.perf_counter() - start < windows.warmup_seconds:
    step()
  sync()
  rates, others = [], []
  for _ in range(windows.count):
    machine0, ours0 = cpu_ticks()
    start, images = time.perf_counter(), 0
    while time.perf_counter() - start < windows.seconds:
      images += step()
    sync()
    seconds = time.perf_counter() - start
    machine1, ours1 = cpu_ticks()
    rates.append(images / seconds)
    others.append(max(0.0, (machine1 - machine0) - (ours1 - ours0)) / hz / seconds)
  return rates, others


def timed_jax(name: str, dispatch: Callable[[], Any], batch_size: int,
              windows: Windows) -> tuple[Measurement, float]:
  """Measures ``dispatch`` (launches one jitted call on a batch, returns its outputs) with
  one call in flight, as in the training loop.

  Returns the measurement and the seconds of the first call (trace, compile, one run).
  """
  import jax  # pylint: disable=import-outside-toplevel
  start = time.perf_counter()
  held = [jax.block_until_ready(dispatch())]
  first = time.perf_counter() - start

  def step() -> int:
    previous, held[0] = held[0], dispatch()
    jax.block_until_ready(previous)
    return batch_size

  rates, others = measure(step, lambda: jax.block_until_ready(held[0]), windows)
  return Measurement(name, batch_size, None, rates, others, windows.quiet_cores), first


def peer_environment() -> dict[str, str]:
  """This process's environment for a PyTorch peer: without the malloc tunables cnnjax's
  commands add (``cnnjax.runtime.MALLOC_TUNABLES``, when they are all there is), as a
  PyTorch user runs."""
  from cnnjax import runtime  # pylint: disable=import-outside-toplevel
  env = dict(os.environ)
  if env.get("GLIBC_TUNABLES") == runtime.malloc_tunables({}):
    del env["GLIBC_TUNABLES"]
  return env


def peer_process(request: dict[str, Any], windows: Windows, notes: list[str],
                 what: str) -> dict[str, Any] | None:
  """What ``python -m benchmarks.torch_peers`` measures for ``request`` (see its
  ``measure_request``) with ``windows``, in a fresh process of its own; None if that process
  fails, with a note on ``what`` saying why (the row keeps its JAX figures)."""
  payload = json.dumps({**request, "windows": dataclasses.asdict(windows)})
  done = subprocess.run([sys.executable, "-m", "benchmarks.torch_peers", payload],
                        capture_output=True, text=True, env=peer_environment(), check=False)
  if done.returncode:
    last = (done.stderr.strip().splitlines() or ["no output"])[-1]
    note(notes, f"{what}: PyTorch peer not measured (the PyTorch peer's process exited with "
                f"{done.returncode}: {last})")
    return None
  return json.loads(done.stdout.strip().splitlines()[-1])


def peer_measurement(name: str, batch_size: int, result: dict[str, list[float]],
                     windows: Windows) -> Measurement:
  """A ``Measurement`` of a peer's ``{'rates', 'others'}``."""
  return Measurement(name, batch_size, None, result["rates"], result["others"],
                     windows.quiet_cores)


def windows_kept(measurements: list[Measurement]) -> str:
  """'kept/all' windows over ``measurements``."""
  return (f"{sum(len(m.kept) for m in measurements)}/"
          f"{sum(len(m.rates) for m in measurements)}")


def progress(text: str) -> None:
  """Prints ``text`` on stderr at once (stdout gets the report)."""
  print(text, file=sys.stderr, flush=True)


def note(notes: list[str], text: str) -> None:
  """Prints ``text`` now and adds it to the report's ``notes``."""
  progress(text)
  notes.append(text)


def machine(with_torch: bool) -> dict[str, str]:
  """The machine, versions (the torch peers' too when ``with_torch``), tunables and
  kernels of this process, as the report's lines show them."""
  from cnnjax import logs, onednn, runtime  # pylint: disable=import-outside-toplevel
  info = logs.run_info()
  versions = {"python": info["python"], **info["packages"]}
  for name in PACKAGES + (TORCH_PACKAGES if with_torch else ()):
    try:
      versions[name] = metadata.version(name)
    except metadata.PackageNotFoundError:
      continue
  kernels = (runtime.ONEDNN_KERNELS if onednn.available()
             else f"XLA's (oneDNN unavailable: {onednn.unavailable_reason()})")
  return {
      "machine": (f"{info['cpu']}, {info['cpu_count']} cores "
                  f"({len(os.sched_getaffinity(0))} usable); {info['platform']}; "
                  f"devices {', '.join(info['devices'])}"),
      "versions": ", ".join(f"{k} {v}" for k, v in versions.items() if v is not None),
      "tunables": (f"XLA_FLAGS: `{info['xla_flags']}`; "
                   f"GLIBC_TUNABLES: `{os.environ.get('GLIBC_TUNABLES', '')}`"),
      "kernels": kernels}


def report(title: str, command: str, measurements: list[Measurement], table: list[str],
           notes: list[str], windows: Windows, with_torch: bool) -> str:
  """The markdown section: title and date, ``command``, machine, versions, method, the
  ``table`` (header and rows) and ``notes``; ``measurements`` are all those behind the
  table, for the count of quiet windows."""
  m = machine(with_torch)
  total = sum(len(r.rates) for r in measurements)
  quiet = sum(len(r.kept) for r in measurements)
  if not total:
    state = "Nothing was measured (see the notes)."
  elif quiet == total:
    state = "The machine was quiet: every window was kept."
  else:
    busy_cores = statistics.median(o for r in measurements for o in r.others)
    state = (f"**The machine was not quiet**: {total - quiet} of {total} windows had other "
             f"processes using >= {windows.quiet_cores:g} cores (median {busy_cores:.2f} "
             f"cores over all windows) and were discarded; rows marked busy had no quiet "
             f"window and show the median of all their windows, a lower bound to re-run on "
             f"a quiet machine.")
  lines = [
      f"## {title}: {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}", "",
      f"`{command}`", "",
      f"- Machine: {m['machine']}", f"- Versions: {m['versions']}", f"- {m['tunables']}",
      f"- cnnjax kernels: {m['kernels']}",
      f"- Method: median images/s over {windows.count} windows of {windows.seconds:g} s "
      f"after {windows.warmup_seconds:g} s of warm-up; a window is kept when other processes "
      f"used < {windows.quiet_cores:g} cores during it (from /proc).",
      f"- {state}", "", *table, "", *(f"- {n}" for n in notes), "", ""]
  return "\n".join(lines)
