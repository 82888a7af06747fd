"""TensorBoard event files of a run, in its workdir.

Scalars: ``train/loss``, ``train/accuracy`` (running means over the epoch so far) and
``train/lr`` every ``log_every_steps``; ``val/loss``, ``val/accuracy`` and ``epoch/train_loss``,
``epoch/train_accuracy``, ``epoch/seconds`` every epoch; ``test/*`` (loss, accuracies, macro
precision/recall/F1) at the end. Images: ``curves`` every epoch, ``confusion`` and ``predictions`` at
the end. ``tensorboard --logdir runs`` shows every run under ``runs/`` by its workdir's name
(and the runs a ``--new_run`` set aside as ``NAME/previous/N``).

A resumed run writes a new event file that purges the events after its checkpoint's step,
so TensorBoard shows one line per run, not the abandoned tail of the interrupted one.

The file is written here: TFRecords (length, masked CRC-32C, data, masked CRC-32C) of
``Event`` protobuf messages, of which a scalar, an image (the PNG as it is) and the purge
use a handful of fields. No TensorFlow, and no tensorboardX, whose import also imports
torch where it is installed (1-2 s of a run's first epoch). The file opens at the first
event; it is flushed every epoch (``flush``), by the first event 10 s after the last flush,
and on close.
"""
import io
import os
import pathlib
import socket
import struct
import time
from typing import Any

import numpy as np
from PIL import Image

FLUSH_SECONDS = 10.0
_COLORSPACES = {"L": 1, "LA": 2, "RGB": 3, "RGBA": 4}  # tensorflow.Summary.Image.colorspace


def _crc32c_table() -> tuple[int, ...]:
  table = []
  for n in range(256):
    for _ in range(8):
      n = (n >> 1) ^ (0x82F63B78 if n & 1 else 0)  # Castagnoli, reflected
    table.append(n)
  return tuple(table)


_CRC_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
  """CRC-32C (Castagnoli) of ``data``, as TFRecord files use it."""
  crc, table = 0xFFFFFFFF, _CRC_TABLE
  for byte in data:
    crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
  return crc ^ 0xFFFFFFFF


def record(data: bytes) -> bytes:
  """One TFRecord: ``data``'s length (uint64), its masked CRC, ``data``, its masked CRC."""
  def masked(b: bytes) -> bytes:
    crc = crc32c(b)
    return struct.pack("<I", (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF)
  length = struct.pack("<Q", len(data))
  return length + masked(length) + data + masked(data)


# Protobuf's wire format: a field is varint(number << 3 | wire type), then its value.
def _varint(n: int) -> bytes:
  out = bytearray()
  while n > 0x7F:
    out.append(n & 0x7F | 0x80)
    n >>= 7
  out.append(n)
  return bytes(out)


def _int(number: int, value: int) -> bytes:  # int32/int64: negatives as 64-bit two's complement
  return _varint(number << 3) + _varint(value & 0xFFFFFFFFFFFFFFFF)


def _message(number: int, data: bytes) -> bytes:  # also strings and bytes
  return _varint(number << 3 | 2) + _varint(len(data)) + data


def _float(number: int, value: float) -> bytes:
  with np.errstate(over="ignore"):  # beyond float32's range: +-inf, as TensorBoard shows it
    return _varint(number << 3 | 5) + np.float32(value).astype("<f4").tobytes()


def event(step: int, *, summary: bytes = b"", file_version: str = "",
          session_start: bool = False, wall_time: float | None = None) -> bytes:
  """An ``Event``: wall_time (1), step (2), file_version (3), summary (5; ``Value`` fields
  from ``scalar_value``/``image_value``), session_log (7, status START: TensorBoard drops
  the events of this run at steps >= ``step`` written before it)."""
  wall_time = time.time() if wall_time is None else wall_time
  msg = _varint(1 << 3 | 1) + struct.pack("<d", wall_time) + _int(2, step)
  if file_version:
    msg += _message(3, file_version.encode())
  if summary:
    msg += _message(5, summary)
  if session_start:
    msg += _message(7, _int(1, 1))
  return msg


def scalar_value(tag: str, value: float) -> bytes:
  """A ``Summary.value`` entry: tag (1), simple_value (2, float32)."""
  return _message(1, _message(1, tag.encode()) + _float(2, value))


def image_value(tag: str, png: bytes, height: int, width: int, colorspace: int) -> bytes:
  """A ``Summary.value`` entry: tag (1), image (4: height, width, colorspace, the PNG)."""
  image = _int(1, height) + _int(2, width) + _int(3, colorspace) + _message(4, png)
  return _message(1, _message(1, tag.encode()) + _message(4, image))


class Events:
  """Writes a run's events; ``start_step`` > 0: a resumed run (see the module docstring)."""

  def __init__(self, workdir: str | pathlib.Path, start_step: int = 0):
    self._workdir, self._start_step = pathlib.Path(workdir), start_step
    self._path = None  # the event file, once the first event opened it
    self._file = None
    self._flushed = time.monotonic()

  def _write(self, data: bytes) -> None:
    if self._path is None:
      name = f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}.{os.getpid()}"
      self._path = self._workdir / name
      self._file = open(self._path, "ab")  # pylint: disable=consider-using-with
      self._file.write(record(event(0, file_version="brain.Event:2")))
      if self._start_step:
        self._file.write(record(event(self._start_step, session_start=True)))
    elif self._file is None:  # written to after close: the same file, no second purge
      self._file = open(self._path, "ab")  # pylint: disable=consider-using-with
    self._file.write(record(data))
    if time.monotonic() - self._flushed > FLUSH_SECONDS:
      self.flush()

  def scalars(self, prefix: str, values: dict[str, Any], step: int) -> None:
    """``prefix/name`` for each number in ``values`` (other values are skipped)."""
    numbers = {name: float(value) for name, value in values.items()
               if isinstance(value, (int, float, np.number)) and not isinstance(value, bool)}
    summary = b"".join(scalar_value(f"{prefix}/{name}", v) for name, v in numbers.items())
    if summary:
      self._write(event(step, summary=summary))

  def image(self, tag: str, path: str | pathlib.Path, step: int) -> None:
    """The PNG at ``path`` as image ``tag``."""
    png = pathlib.Path(path).read_bytes()
    with Image.open(io.BytesIO(png)) as img:
      (width, height), colorspace = img.size, _COLORSPACES.get(img.mode, 3)
    self._write(event(step, summary=image_value(tag, png, height, width, colorspace)))

  def flush(self) -> None:
    if self._file is not None:
      self._file.flush()
    self._flushed = time.monotonic()

  def close(self) -> None:
    if self._file is not None:
      self._file.close()
      self._file = None
