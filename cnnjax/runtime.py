"""The process's CPU settings, applied explicitly: importing cnnjax changes nothing.

- ``process_environment(environ)``: what a process should start with, the environment
  variables read only when a process or JAX's backend starts: XLA:CPU flags measured to be
  faster (Eigen convolutions instead of YNNPACK's fusions; ``CNNJAX_XLA_DEFAULTS=0`` keeps
  XLA's own) and glibc's malloc tunables for XLA's per-step buffers (``MALLOC_TUNABLES``:
  the buffers kept between steps; ``CNNJAX_MALLOC=0`` keeps glibc's
  defaults). The user's own values always stand. The commands apply it in
  ``experiments.entry`` before JAX starts (restarting once for the tunables, which glibc
  reads only at process start); a notebook or program exports the same variables itself
  (the README says how).
- ``configure()``: the kernels the layers use, chosen once (oneDNN's convolutions and batch
  norm where the extension builds and the computation runs on one device, else XLA's),
  building the oneDNN extension now rather than at the first trace. The commands, the
  Learner and the benchmarks call it; until then the layers use XLA's kernels.
  It also turns on JAX's persistent compilation cache in ``cache_dir()/xla`` (unless
  ``JAX_COMPILATION_CACHE_DIR`` chooses another place, or is set empty to turn it off), so
  a second run of a study skips XLA's compiles: those of 0.1 s or more (JAX's default, 1 s,
  leaves out the evaluation step's; ``JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS`` sets
  another), in cnnjax's place at most 2 GiB, least recently used evicted.
- ``cache_dir()``: where cnnjax keeps built and converted files.
- ``compute_dtype(precision)``: what ``config.precision`` computes in here: 'bfloat16' on
  GPU/TPU and on CPUs with bf16 instructions (AVX-512 BF16 or AMX), else float32; 'auto'
  (the default) is bfloat16 on GPU/TPU, float32 on CPU.
"""
import functools
import os
import pathlib
from collections.abc import Mapping

XLA_CPU_FLAGS = {
    # Eigen convolutions instead of YNNPACK's fusions (BENCHMARKS.md).
    "--xla_cpu_experimental_ynn_fusion_type": "",
}
# XLA:CPU allocates a step's intermediate buffers as one block (~200 MB for BNCNN at batch
# 128) and frees it after the step. By default glibc maps such a block afresh every step and
# the kernel zeroes its pages on first touch (BENCHMARKS.md): from one arena, never mapped
# apart nor trimmed, the block is reused and costs none. Not glibc.malloc.hugetlb=1 (used
# until 2026-12-05): its huge-page faults stall in the kernel's compaction as the heap grows,
# 1.4-2 s in the first train step and 0.7-1 s spikes in the next few, for no steady-state gain.
MALLOC_TUNABLES = {
    "glibc.malloc.arena_max": "1",  # one heap for all threads (XLA's workers allocate it)
    "glibc.malloc.mmap_max": "0",  # large blocks from the heap, not separate mappings
    "glibc.malloc.trim_threshold": str(2**32 - 1),  # freed memory kept for the next step
}
_onednn = False
_onednn_bf16 = False
ONEDNN_KERNELS = ("oneDNN convolutions, batch norm and bf16 dense products, max pooling "
                  "(cnnjax.onednn)")  # kernels()
PRECISIONS = ("auto", "float32", "bfloat16")
_CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo's names


def cache_dir() -> pathlib.Path:
  """``$CNNJAX_CACHE``, else ``~/.cache/cnnjax``: the built oneDNN extension, converted weights."""
  return pathlib.Path(os.environ.get("CNNJAX_CACHE", "~/.cache/cnnjax")).expanduser()


def xla_flags(environ: Mapping[str, str]) -> str:
  """``XLA_FLAGS`` with cnnjax's CPU defaults added where the user set no value of their own."""
  flags = environ.get("XLA_FLAGS", "")
  if environ.get("CNNJAX_XLA_DEFAULTS", "1") == "0":
    return flags
  for name, value in XLA_CPU_FLAGS.items():
    if name not in flags:
      flags = f"{flags} {name}={value}".strip()
  return flags


def malloc_tunables(environ: Mapping[str, str]) -> str | None:
  """``GLIBC_TUNABLES`` with each of ``MALLOC_TUNABLES`` the user did not set added, or None
  when there is none to add (the user's choices stand) or ``CNNJAX_MALLOC=0``."""
  tunables = environ.get("GLIBC_TUNABLES", "")
  missing = [f"{k}={v}" for k, v in MALLOC_TUNABLES.items() if k not in tunables]
  if environ.get("CNNJAX_MALLOC", "1") == "0" or not missing:
    return None
  return ":".join(t for t in (tunables, *missing) if t)


def has_glibc() -> bool:
  """Whether this Python runs on glibc (whose tunables ``MALLOC_TUNABLES`` are)."""
  try:
    return os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc")
  except (OSError, ValueError, AttributeError):
    return False


def process_environment(environ: Mapping[str, str]) -> dict[str, str]:
  """The variables of ``environ`` a cnnjax process should start with that differ from it
  (``XLA_FLAGS``, ``GLIBC_TUNABLES``); empty when there is nothing to change."""
  changes = {}
  flags = xla_flags(environ)
  if flags != environ.get("XLA_FLAGS", ""):
    changes["XLA_FLAGS"] = flags
  tunables = malloc_tunables(environ)
  if tunables is not None and has_glibc():
    changes["GLIBC_TUNABLES"] = tunables
  return changes


def configure(onednn: bool = True) -> bool:
  """Chooses the layers' kernels for this process: oneDNN's where ``onednn``, the extension
  is available (built here on first use) and JAX runs on one CPU device; else XLA's.
  Call it after ``jax.distributed.initialize`` (it counts the devices). Returns the choice."""
  global _onednn, _onednn_bf16
  import jax  # pylint: disable=import-outside-toplevel
  from cnnjax import onednn as onednn_lib  # pylint: disable=import-outside-toplevel
  if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    jax.config.update("jax_compilation_cache_dir", str(cache_dir() / "xla"))
    jax.config.update("jax_compilation_cache_max_size", 2 << 30)  # least recently used evicted
  if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
    # JAX's default, 1 s, would leave the evaluation step's compile out.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.1)
  _onednn = bool(onednn) and jax.device_count() == 1 and onednn_lib.available()
  _onednn_bf16 = _onednn and cpu_has_bf16()
  return _onednn


def onednn_in_use(dtype: str = "float32") -> bool:
  """Whether the models' convolutions, batch norms, max pooling (and in bfloat16 dense
  products) of ``dtype`` run on the oneDNN extension (``configure``; float32 and bfloat16
  only, bfloat16 only where the CPU has bf16 instructions)."""
  return {"float32": _onednn, "bfloat16": _onednn_bf16}.get(dtype, False)


def kernels() -> str:
  """What the layers run, in words (for run headers and benchmark reports)."""
  if _onednn:
    return ONEDNN_KERNELS
  from cnnjax import onednn as onednn_lib  # pylint: disable=import-outside-toplevel
  why = onednn_lib.unavailable_reason() or "not chosen: several devices, or no configure()"
  return f"XLA's kernels (oneDNN {why})"


def cpu_has_bf16(cpuinfo: str | None = None) -> bool:
  """Whether this CPU computes bfloat16 natively (AVX-512 BF16 or AMX; read from
  ``/proc/cpuinfo``, or ``cpuinfo`` text if given). Elsewhere bf16 is emulated, slower than
  float32."""
  if cpuinfo is None:
    cpuinfo = _cpuinfo()
  flags = next((line.split(":", 1)[1].split() for line in cpuinfo.splitlines()
                if line.startswith("flags")), [])
  return any(flag in flags for flag in _CPU_BF16_FLAGS)


@functools.cache
def _cpuinfo() -> str:
  """``/proc/cpuinfo``, read once ('' where there is none)."""
  try:
    return pathlib.Path("/proc/cpuinfo").read_text()
  except OSError:
    return ""


def compute_dtype(precision: str) -> tuple[str, str]:
  """``(dtype, note)``: the dtype the layers compute in for ``config.precision`` ('auto',
  'float32' or 'bfloat16'; parameters, optimizer state, batch-norm statistics and the loss
  stay float32), and a line for the run header. 'auto' is bfloat16 on GPU/TPU (XLA's
  kernels) and float32 on CPU; bfloat16 falls back to float32 on a CPU without bf16
  instructions."""
  import jax  # pylint: disable=import-outside-toplevel
  from cnnjax.errors import UserError  # pylint: disable=import-outside-toplevel
  if precision not in PRECISIONS:
    raise UserError(f"precision {precision!r}; expected one of {list(PRECISIONS)}")
  if precision == "auto":
    precision = "float32" if jax.default_backend() == "cpu" else "bfloat16"
  if precision == "float32":
    return "float32", "Precision: float32"
  if jax.default_backend() == "cpu" and not cpu_has_bf16():
    return "float32", ("Precision: float32 (bfloat16 asked for, but this CPU has no bf16 "
                       "instructions: emulated bf16 would be slower)")
  return "bfloat16", ("Precision: bfloat16 compute; float32 parameters, optimizer state, "
                      "batch-norm statistics and loss")
