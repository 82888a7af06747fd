"""What a run writes besides checkpoints: per-epoch metrics as JSON lines and CSV, and the
machine, versions and devices it ran on.

TensorBoard event files are ``cnnjax.tensorboard``'s; these plain files open in any
spreadsheet or ``pandas.read_csv``.
"""
import csv
import json
import os
import pathlib
import platform
import sys
from importlib import metadata
from typing import Any, Sequence

import jax

PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "numpy", "ml_dtypes",
            "tensorflow-datasets")


def say(line: str) -> None:
  """Prints ``line`` on process 0 of a run, flushed (logs read as they are written)."""
  if jax.process_index() == 0:
    print(line, flush=True)


def columns(rows: Sequence[dict[str, Any]]) -> dict[str, list[Any]]:
  """Rows of per-epoch dicts as column -> values (None where a row lacks the key)."""
  keys = list(dict.fromkeys(k for row in rows for k in row))
  return {k: [row.get(k) for row in rows] for k in keys}


def write_csv(rows: Sequence[dict[str, Any]], path: str | os.PathLike) -> pathlib.Path:
  path = pathlib.Path(path)
  table = columns(rows)
  with path.open("w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(table)
    writer.writerows(zip(*table.values()))
  return path


def write_history(rows: Sequence[dict[str, Any]], workdir: pathlib.Path) -> None:
  """``metrics.jsonl`` (one JSON object per epoch) and ``metrics.csv`` in ``workdir``."""
  (workdir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  write_csv(rows, workdir / "metrics.csv")


def read_history(workdir: pathlib.Path, up_to_epoch: int) -> list[dict[str, Any]]:
  """Rows of ``metrics.jsonl`` for epochs ``<= up_to_epoch`` (those a checkpoint covers)."""
  path = workdir / "metrics.jsonl"
  if not path.exists():
    return []
  rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
  return [r for r in rows if r["epoch"] <= up_to_epoch]


def _cpu_model() -> str:
  try:
    for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name"):
        return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def run_info() -> dict[str, Any]:
  """The machine, Python and package versions, and JAX devices of this process."""
  versions = {}
  for name in PACKAGES:
    try:
      versions[name] = metadata.version(name)
    except metadata.PackageNotFoundError:
      versions[name] = None
  return {"python": sys.version.split()[0], "platform": platform.platform(), "cpu": _cpu_model(),
          "cpu_count": os.cpu_count(), "packages": versions,
          "devices": [str(d) for d in jax.devices()], "process_count": jax.process_count(),
          "xla_flags": os.environ.get("XLA_FLAGS", "")}
