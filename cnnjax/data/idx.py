"""The idx format of the official MNIST and Fashion-MNIST files, read and written in numpy.

An idx file is a 4-byte magic number ``00 00 <dtype> <ndim>``, then ``ndim`` big-endian
uint32 dimensions, then the values in C order. Only dtype byte ``0x08`` (uint8) is
supported: MNIST images are ``0x00000803`` ``[N, 28, 28]`` and labels ``0x00000801``
``[N]``. Files may be gzipped; gzip is recognised by its content, not by its name.
"""
import gzip
import os
from typing import BinaryIO

import numpy as np

from cnnjax.errors import UserError

_UINT8 = 0x08
_GZIP_MAGIC = b"\x1f\x8b"
# Standard names: the official one and the dotted variant found in some mirrors.
_SPLITS = {"train": "train", "test": "t10k"}
_NAME_PATTERNS = ("{prefix}-{kind}-idx{ndim}-ubyte", "{prefix}-{kind}.idx{ndim}-ubyte")


def _open(path: str | os.PathLike) -> BinaryIO:
  """Opens ``path`` for reading, through gzip when its first bytes are the gzip magic."""
  with open(path, "rb") as f:
    is_gzip = f.read(2) == _GZIP_MAGIC
  return gzip.open(path, "rb") if is_gzip else open(path, "rb")


def _read_exact(f: BinaryIO, n: int, path: str | os.PathLike, what: str) -> bytes:
  data = f.read(n)
  if len(data) != n:
    raise UserError(f"{path}: expected {n} bytes of {what}, found {len(data)}; "
                    "the file is truncated or not an idx file")
  return data


def read_idx(path: str | os.PathLike, ndim: int | None = None) -> np.ndarray:
  """Reads an idx file of uint8 values, gzipped or not.

  Args:
    path: the file.
    ndim: if given, the number of dimensions the file must have (3 for MNIST images,
      1 for labels).
  Returns:
    uint8 array with the shape given by the header, e.g. images ``[N, 28, 28]`` or
    labels ``[N]``.
  Raises:
    UserError: the file is missing, is not uint8 idx (with ``ndim`` dims), or its payload
      is not exactly the size the header announces.
  """
  if not os.path.isfile(path):
    raise UserError(f"{path}: no such idx file")
  try:
    with _open(path) as f:
      magic = _read_exact(f, 4, path, "idx magic number")
      if magic[:2] != b"\0\0" or magic[2] != _UINT8 or magic[3] == 0:
        raise UserError(f"{path}: magic number 0x{magic.hex()} is not that of a uint8 idx "
                        "file (expected 0x000008 then the number of dimensions, e.g. "
                        "0x00000803 for images, 0x00000801 for labels)")
      if ndim is not None and magic[3] != ndim:
        raise UserError(f"{path}: idx file has {magic[3]} dimensions (magic 0x{magic.hex()}),"
                        f" expected {ndim} (magic 0x{bytes([0, 0, _UINT8, ndim]).hex()})")
      header = _read_exact(f, 4 * magic[3], path, "dimensions in the header")
      shape = tuple(int(d) for d in np.frombuffer(header, ">u4"))
      payload = f.read()
  except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError.
    raise UserError(f"{path}: cannot read idx file: {e}") from None
  expected = int(np.prod(shape))
  if len(payload) != expected:
    raise UserError(f"{path}: expected {expected} bytes of data after the header "
                    f"(shape {shape}), found {len(payload)}")
  return np.frombuffer(payload, np.uint8).reshape(shape).copy()


def write_idx(path: str | os.PathLike, array: np.ndarray) -> None:
  """Writes ``array`` as a uint8 idx file, gzipped when ``path`` ends with ``.gz``.

  Args:
    path: the file to write.
    array: ``[d0, ..., dk]`` with 1 to 255 dimensions, of dtype uint8 or an integer
      dtype with values in 0..255 (e.g. int64 labels ``[N]``).
  Raises:
    UserError: ``array`` cannot be stored as uint8 idx.
  """
  array = np.asarray(array)
  if not 1 <= array.ndim <= 255:
    raise UserError(f"write_idx {path}: array has {array.ndim} dimensions, expected 1..255")
  if array.dtype != np.uint8:
    if not np.issubdtype(array.dtype, np.integer) or (
        array.size and (array.min() < 0 or array.max() > 255)):
      raise UserError(f"write_idx {path}: array of dtype {array.dtype} does not fit uint8 "
                      "(expected integers in 0..255)")
  header = bytes([0, 0, _UINT8, array.ndim]) + np.asarray(array.shape, ">u4").tobytes()
  data = header + np.ascontiguousarray(array, np.uint8).tobytes()
  if str(path).endswith(".gz"):
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as f:
      f.write(data)  # mtime=0: the same array always gives the same bytes.
  else:
    with open(path, "wb") as f:
      f.write(data)


def _base_names(prefix: str, kind: str, ndim: int) -> list[str]:
  return [p.format(prefix=prefix, kind=kind, ndim=ndim) for p in _NAME_PATTERNS]


def load_idx_folder(folder: str | os.PathLike) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """Loads the four standard MNIST-style idx files from ``folder``.

  Looks for ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
  ``t10k-images-idx3-ubyte`` and ``t10k-labels-idx1-ubyte``, each plain or with ``.gz``,
  or with a dot before ``idx`` (``train-images.idx3-ubyte``).

  Returns:
    ``{'train': (images, labels), 'test': (images, labels)}`` with images
    ``[N, H, W, 1]`` uint8 (``H = W = 28`` for MNIST) and labels ``[N]`` int64.
  Raises:
    UserError: ``folder`` is not a directory, a file is missing or malformed, or a
      split's image and label counts differ.
  """
  if not os.path.isdir(folder):
    raise UserError(f"{folder}: not a directory (expected a folder of MNIST idx files)")
  present = set(os.listdir(folder))
  paths, missing = {}, []
  for split, prefix in _SPLITS.items():
    for kind, ndim in (("images", 3), ("labels", 1)):
      names = _base_names(prefix, kind, ndim)
      found = [n + ext for n in names for ext in ("", ".gz") if n + ext in present]
      if found:
        paths[split, kind] = os.path.join(folder, found[0])
      else:
        missing.append(" or ".join(f"{n}[.gz]" for n in names))
  if missing:
    raise UserError(f"{folder}: missing idx files; looked for {'; '.join(missing)}")
  out = {}
  for split in _SPLITS:
    images = read_idx(paths[split, "images"], ndim=3)
    labels = read_idx(paths[split, "labels"], ndim=1)
    if len(images) != len(labels):
      raise UserError(f"{paths[split, 'images']} has {len(images)} images but "
                      f"{paths[split, 'labels']} has {len(labels)} labels; expected equal")
    out[split] = (images[..., None], labels.astype(np.int64))
  return out
