"""Transparent huge pages for XLA:CPU's step buffers (Linux with glibc).

XLA:CPU allocates all of a step's intermediate buffers as one block per execution (211 MB for
BNCNN at batch 128); glibc's ``malloc`` maps a block that large fresh from the kernel and
unmaps it when freed, so every step faults in and zeroes every page again: 51,700 page faults
and 90 ms of kernel time per 210 ms step. With glibc's ``glibc.malloc.hugetlb=1`` tunable
the block is mapped with transparent huge pages (where the kernel's THP mode is ``always``
or ``madvise``): 500 faults and 12 ms, the step 1.3x faster (BENCHMARKS.md). glibc reads its
tunables only when a process starts, so ``restart_with_huge_pages(package)`` re-executes
the current ``python -m <package>...`` command with the tunable added to ``GLIBC_TUNABLES``;
every ``python -m experiments...`` command does so when it starts (``experiments/__init__.py``).
Set it yourself in other programs (``export GLIBC_TUNABLES=glibc.malloc.hugetlb=1``);
``CNNJAX_HUGE_PAGES=0`` turns the restart off.
"""
import os
import pathlib
import sys

TUNABLE = "glibc.malloc.hugetlb"
_THP_MODE = pathlib.Path("/sys/kernel/mm/transparent_hugepage/enabled")


def tunables_with_huge_pages(environ: dict[str, str] | os._Environ) -> str | None:
  """``GLIBC_TUNABLES`` with ``glibc.malloc.hugetlb=1`` added, or None when it is set
  already (to any value: the user's choice stands) or turned off by ``CNNJAX_HUGE_PAGES=0``."""
  tunables = environ.get("GLIBC_TUNABLES", "")
  if environ.get("CNNJAX_HUGE_PAGES", "1") == "0" or TUNABLE in tunables:
    return None
  return ":".join(t for t in (tunables, f"{TUNABLE}=1") if t)


def _kernel_has_huge_pages() -> bool:
  try:
    return "[never]" not in _THP_MODE.read_text()
  except OSError:
    return False


def restart_with_huge_pages(package: str) -> None:
  """Re-executes this process's ``python -m <package>[.<module>] ...`` command with the
  tunable (see the module docstring); returns without doing anything when the process is not
  such a command (an import from elsewhere, ``python -m pytest``), not on Linux with glibc and
  transparent huge pages, or when the tunable needs no change."""
  argv = getattr(sys, "orig_argv", [])
  tunables = tunables_with_huge_pages(os.environ)
  if (tunables is None or len(argv) < 3 or argv[1] != "-m"
      or argv[2].split(".")[0] != package or sys.platform != "linux"
      or not os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc")
      or not _kernel_has_huge_pages()):
    return
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, [sys.executable, *argv[1:]],
            {**os.environ, "GLIBC_TUNABLES": tunables})
