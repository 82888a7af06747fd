"""A run's working directory: one run at a time, and a rerun resumes only the same run.

- ``Lock``: ``workdir/.lock`` held with ``fcntl.flock`` while a run writes there. A second run
  in the same workdir refuses, naming the first (pid, host). The kernel releases a flock when
  its process dies, however it dies (kill -9 too), so the lock of a killed run is free and
  is taken over; the pid it names is reported.
- ``compare``: the keys in which a rerun's config differs from the saved run's, leaving out
  those that do not change the trajectory (``HARMLESS``).
- ``set_aside``: moves an earlier run's files to ``workdir/previous/<n>/`` (``--new_run``);
  nothing a run wrote is deleted.
"""
import datetime
import errno
import fcntl
import json
import os
import pathlib
import socket
import sys

import ml_collections

from cnnjax import config as config_lib
from cnnjax.errors import UserError

LOCK = ".lock"
PREVIOUS = "previous"
# Keys a finished or interrupted run may be rerun with another value of: they change
# neither the weights nor the validation metrics the best checkpoint is chosen by.
HARMLESS = frozenset({"log_every_steps", "data.workers", "eval_batch_size", "data.tfds_data_dir",
                      "test_with", "eval_rotation"})


def checked(workdir: str | os.PathLike) -> pathlib.Path:
  """``workdir`` as a path, or a UserError if it exists and is not a directory."""
  path = pathlib.Path(workdir)
  if path.exists() and not path.is_dir():
    raise UserError(f"--workdir {path} is a file; expected a directory (new or a run's)")
  return path


class Lock:
  """``with Lock(workdir):`` the run owns ``workdir``; a UserError if another run does.

  A workdir this lock created is removed again on exit if nothing but the lock was
  written into it (a run that failed before its first write leaves nothing behind).
  """

  def __init__(self, workdir: str | os.PathLike):
    self.workdir = checked(workdir)
    self.path = self.workdir / LOCK
    self.taken_over: dict | None = None  # the lock record of a stopped run, if any
    self._fd: int | None = None
    self._created = False

  def __enter__(self) -> "Lock":
    self._created = not self.workdir.exists()
    try:
      self.workdir.mkdir(parents=True, exist_ok=True)
      self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
      raise UserError(f"cannot write to --workdir {self.workdir} ({e.strerror}); expected a "
                      "writable directory") from e
    try:
      fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = _read(self._fd)
      os.close(self._fd)
      self._fd = None
      who = (f"pid {holder.get('pid')} on {holder.get('host')}, started {holder.get('started')}"
             if holder else "another process")
      raise UserError(f"--workdir {self.workdir} is in use by another run ({who}); wait for it "
                      "to end, stop it, or use another --workdir") from None
    self.taken_over = _read(self._fd) or None
    record = {"pid": os.getpid(), "host": socket.gethostname(),
              "started": datetime.datetime.now().isoformat(timespec="seconds"),
              "command": " ".join(sys.argv)}
    os.ftruncate(self._fd, 0)
    os.pwrite(self._fd, json.dumps(record).encode(), 0)
    return self

  def __exit__(self, *exc) -> None:
    os.ftruncate(self._fd, 0)  # an empty lock file: no run holds or held it
    if self._created and [p.name for p in self.workdir.iterdir()] == [LOCK]:
      self.path.unlink()
      self.workdir.rmdir()
    fcntl.flock(self._fd, fcntl.LOCK_UN)
    os.close(self._fd)
    self._fd = None


def _read(fd: int) -> dict:
  try:
    text = os.pread(fd, 4096, 0).decode()
    return json.loads(text) if text.strip() else {}
  except (OSError, ValueError):
    return {"pid": "?", "host": "?", "started": "?"}


def holds_run(workdir: pathlib.Path) -> bool:
  """Whether ``workdir`` holds (part of) a run: a saved config beside metrics or checkpoints."""
  ckpt = workdir / "checkpoints"
  return (workdir / "config.json").exists() and (
      (workdir / "metrics.jsonl").exists() or (ckpt.is_dir() and any(ckpt.iterdir())))


def compare(saved: ml_collections.ConfigDict, config: ml_collections.ConfigDict) -> list[str]:
  """``['key: saved -> now', ...]`` for every key (but ``HARMLESS``) whose value differs."""
  was, now = config_lib.flat(saved), config_lib.flat(config)
  norm = lambda v: list(v) if isinstance(v, tuple) else v  # JSON has no tuples
  return [f"{k}: {was.get(k)!r} -> {now.get(k)!r}" for k in sorted(was.keys() | now.keys())
          if k not in HARMLESS and norm(was.get(k)) != norm(now.get(k))]


def set_aside(workdir: pathlib.Path) -> pathlib.Path:
  """Moves everything in ``workdir`` (but the lock and earlier set-asides) into
  ``workdir/previous/<n>/``, the first free ``n``; returns that directory."""
  n = 1
  while (workdir / PREVIOUS / str(n)).exists():
    n += 1
  target = workdir / PREVIOUS / str(n)
  target.mkdir(parents=True)
  for path in workdir.iterdir():
    if path.name not in (LOCK, PREVIOUS):
      path.rename(target / path.name)
  return target


def is_disk_full(e: BaseException) -> bool:
  """Whether ``e`` (or what it was raised from) is 'no space left on device'."""
  while e is not None:
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
      return True
    if "No space left on device" in str(e):
      return True
    e = e.__cause__ or e.__context__
  return False
