"""Timing windows on a shared machine, and the markdown report of a run.

Every figure is the median of steady-state windows after a warm-up. The variants of a row
(JAX float32 and bf16, the PyTorch peers) take their windows in turn, round after round
(``timed``), so that a VM whose speed drifts over minutes slows all of them alike and their
ratios hold. The CPU time that other processes (all but this one and its descendants, e.g.
pipeline workers or the peer) used during each window is read from /proc; a window is kept
only when they used fewer than ``Windows.quiet_cores`` cores. When no window of a row was
quiet, the row shows the median of all its windows and is marked busy: such a figure is a
lower bound, not a measurement of this code.

The PyTorch peers run in a process of their own (``Peer``): in a process that had run
cnnjax's steps, PyTorch's BNCNN step ran 20-25% slower (BENCHMARKS.md). That process
imports this module for ``Local``, so JAX and cnnjax are imported where used.
"""
import contextlib
import dataclasses
import datetime
import json
import os
import select
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from typing import Any, Callable, Protocol

# Versions that matter for the figures beyond those of ``logs.run_info``.
PACKAGES = ("pillow", "onednn-cpu-gomp")
TORCH_PACKAGES = ("torch", "torchvision", "efficientnet-lite-pytorch")
PEER_ANSWER_SECONDS = 600  # a peer silent longer than this (building, one window) has hung


@dataclasses.dataclass(frozen=True)
class Windows:
  """How each row is timed: ``count`` windows of ``seconds`` per variant after
  ``warmup_seconds`` of untimed work, each window after ``settle_seconds`` more where a row
  has several variants (they take turns); a window is kept when other processes used fewer
  than ``quiet_cores``."""
  count: int
  seconds: float
  warmup_seconds: float
  quiet_cores: float
  settle_seconds: float = 0.5


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


class Side(Protocol):
  """One variant of a row, timed in windows."""

  def warm_up(self, seconds: float) -> None:
    """Runs untimed work for ``seconds``."""

  def window(self, seconds: float) -> tuple[float, float] | None:
    """Works for ``seconds`` (to the end of the step that crosses them); returns ``(images
    per second, cores other processes used meanwhile)``, or None if it can no longer run."""


@dataclasses.dataclass
class Local:
  """A variant run in this process: ``step`` does one unit of work and returns its number
  of images; ``sync`` waits for work still in flight (a dispatched step)."""
  step: Callable[[], int]
  sync: Callable[[], None]

  def warm_up(self, seconds: float) -> None:
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
      self.step()
    self.sync()

  def window(self, seconds: float) -> tuple[float, float]:
    machine0, ours0 = cpu_ticks()
    start, images = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
      images += self.step()
    self.sync()
    elapsed = time.perf_counter() - start
    machine1, ours1 = cpu_ticks()
    others = max(0.0, (machine1 - machine0) - (ours1 - ours0)) / os.sysconf("SC_CLK_TCK")
    return images / elapsed, others / elapsed


def jax_side(dispatch: Callable[[], Any], batch_size: int) -> tuple[Local, float]:
  """``dispatch`` (launches one jitted call on a batch of ``batch_size``, returns its
  outputs) as a side with one call in flight, as in the training loop; and the seconds of
  its first call (trace, compile, one run), made here."""
  import jax  # pylint: disable=import-outside-toplevel
  start = time.perf_counter()
  held = [jax.block_until_ready(dispatch())]
  first = time.perf_counter() - start

  def step() -> int:
    previous, held[0] = held[0], dispatch()
    jax.block_until_ready(previous)
    return batch_size
  return Local(step, lambda: jax.block_until_ready(held[0])), first


def timed(sides: dict[str, Side], batch_size: int, windows: Windows,
          title: str = "") -> dict[str, Measurement]:
  """Each of ``sides`` (name -> side; batches of ``batch_size``) warmed up, then timed in
  ``windows.count`` rounds: in each round every side in turn runs ``windows.settle_seconds``
  untimed (where there are several: caches and threads back to its own work) and one window.
  A side that stops answering (a failed peer) keeps the windows it had. The measurements
  are keyed by side and named '``title`` side'."""
  for side in sides.values():
    side.warm_up(windows.warmup_seconds)
  results = {name: ([], []) for name in sides}
  for _ in range(windows.count):
    for name, side in sides.items():
      if len(sides) > 1:
        side.warm_up(windows.settle_seconds)
      figures = side.window(windows.seconds)
      if figures is not None:
        results[name][0].append(figures[0])
        results[name][1].append(figures[1])
  return {name: Measurement(f"{title} {name}".strip(), batch_size, None, rates, others,
                            windows.quiet_cores)
          for name, (rates, others) in results.items()}


def peer_environment() -> dict[str, str]:
  """This process's environment for a PyTorch peer: without the malloc tunables cnnjax's
  commands add (``cnnjax.runtime.MALLOC_TUNABLES``, when they are all there is), as a
  PyTorch user runs."""
  from cnnjax import runtime  # pylint: disable=import-outside-toplevel
  env = dict(os.environ)
  if env.get("GLIBC_TUNABLES") == runtime.malloc_tunables({}):
    del env["GLIBC_TUNABLES"]
  return env


class Peer:
  """A PyTorch peer (``python -m benchmarks.torch_peers FD``, see its ``serve``) in a process
  of its own for one row, alive while the row is timed: it builds the row's steps from
  ``request``, then warms up or times one window of a variant at each command. Answers come
  through a pipe of their own (file descriptor FD), so nothing the libraries print can mix
  with them; the process's stdout and stderr go to a file whose last line ``failure`` quotes.

  Attributes:
    params: the peer's parameter count (None for a convolution).
    variants: the names of its variants (``side`` takes one).
    failure: why the peer stopped answering ('the PyTorch peer's process exited with 1:
      ImportError: ...'), else None; it is then ended and answers nothing more.
  """

  def __init__(self, request: dict[str, Any]):
    self.failure: str | None = None
    self._output = tempfile.TemporaryFile("w+")
    read_end, write_end = os.pipe()
    try:
      self._process = subprocess.Popen(
          [sys.executable, "-m", "benchmarks.torch_peers", str(write_end)], pass_fds=(write_end,),
          stdin=subprocess.PIPE, stdout=self._output, stderr=self._output, text=True,
          env=peer_environment())
    finally:
      os.close(write_end)
    self._answers = os.fdopen(read_end)
    built = self.ask(request) or {}
    self.params: int | None = built.get("params")
    self.variants: list[str] = built.get("variants", [])

  def ask(self, message: dict[str, Any]) -> dict[str, Any] | None:
    """The peer's answer to ``message``, within ``PEER_ANSWER_SECONDS``; None once it has
    failed (``failure`` says why)."""
    if self.failure is not None:
      return None
    answer, why = "", ""
    try:
      self._process.stdin.write(json.dumps(message) + "\n")
      self._process.stdin.flush()
      if select.select([self._answers], [], [], PEER_ANSWER_SECONDS)[0]:
        answer = self._answers.readline()
      else:
        why = f"no answer within {PEER_ANSWER_SECONDS} s"
    except OSError:  # a closed pipe: the process has ended
      pass
    try:
      return json.loads(answer) if answer else self._fail(why)
    except json.JSONDecodeError:
      return self._fail(f"answered {answer.strip()[:80]!r}")

  def _fail(self, why: str) -> None:
    """Ends the process (killed when it is still running: ``why`` says it misbehaved) and
    records why it failed: ``why`` or its exit status and last line of output."""
    if why:
      self._process.kill()
    code = self._end()
    self._output.seek(0)
    last = (self._output.read().strip().splitlines() or ["no output"])[-1]
    self.failure = why or f"the PyTorch peer's process exited with {code}: {last}"

  def _end(self) -> int:
    """Closes the peer's input (its end) and waits for it; kills it if it does not end."""
    with contextlib.suppress(OSError):
      self._process.stdin.close()
    try:
      return self._process.wait(PEER_ANSWER_SECONDS)
    except subprocess.TimeoutExpired:
      self._process.kill()
      return self._process.wait()

  def side(self, variant: str) -> "PeerVariant":
    """The side that times ``variant`` (one of ``variants``) in the peer's process."""
    return PeerVariant(self, variant)

  def close(self) -> None:
    """Ends the process and closes the pipes and the output file."""
    self._end()
    self._answers.close()
    self._output.close()

  def __enter__(self) -> "Peer":
    return self

  def __exit__(self, *exc: Any) -> None:
    self.close()


@dataclasses.dataclass
class PeerVariant:
  """A variant of a ``Peer``, timed in its process (nothing once the peer has failed)."""
  peer: Peer
  variant: str

  def warm_up(self, seconds: float) -> None:
    self.peer.ask({"variant": self.variant, "warm_up": seconds})

  def window(self, seconds: float) -> tuple[float, float] | None:
    answer = self.peer.ask({"variant": self.variant, "window": seconds})
    return None if answer is None else (answer["rate"], answer["others"])


def timed_against_peer(sides: dict[str, Side], request: dict[str, Any] | None,
                       batch_size: int, windows: Windows, title: str, notes: list[str],
                       params: int | None = None) -> dict[str, Measurement]:
  """``timed`` of ``sides`` and, as 'torch VARIANT', the variants of a ``Peer`` of
  ``request`` (None: ``sides`` alone), all in turn. A peer that fails (at its start or
  during the windows) leaves only ``sides``' measurements, with a note on ``title`` saying
  why.

  Raises:
    RuntimeError: the peer's model has other than ``params`` parameters (when given).
  """
  if request is None:
    return timed(sides, batch_size, windows, title)
  with Peer(request) as peer:
    if peer.failure is None and params is not None and peer.params != params:
      raise RuntimeError(f"parameter counts differ: cnnjax {params:,}, torch "
                         f"{peer.params:,}; expected the same architecture")
    measured = timed({**sides, **{f"torch {v}": peer.side(v) for v in peer.variants}},
                     batch_size, windows, title)
  if peer.failure is not None:
    note(notes, f"{title}: PyTorch peer not measured ({peer.failure})")
    return {name: m for name, m in measured.items() if name in sides}
  return measured


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
      f"after {windows.warmup_seconds:g} s of warm-up; the variants of a row (where it has "
      f"several) take their windows in turn, each after {windows.settle_seconds:g} s of "
      f"untimed work; a window is kept when other processes used < {windows.quiet_cores:g} "
      f"cores during it (from /proc).",
      f"- {state}", "", *table, "", *(f"- {n}" for n in notes), "", ""]
  return "\n".join(lines)
