"""PyTorch state_dict files (``torch.save``, ``.pth``/``.pt``) read without torch.

Two layouts. The zip archive of torch >= 1.6: ``<name>/data.pkl`` pickles the dict, storage
``k`` is the raw file ``<name>/data/k`` and ``<name>/byteorder`` holds ``little`` (the
default) or ``big``. The legacy stream (torch < 1.6, or ``_use_new_zipfile_serialization=
False``): pickles of a magic number, the protocol version, system info, the dict and its
storage keys, then each storage as an int64 element count and its little-endian bytes.

Both pickles go through ``safe_pickle`` resolving only the globals that
``torch.load(weights_only=True)`` needs for a state_dict of dense tensors; a tensor is a
strided view (size, stride, offset in elements) of its storage.
"""
import os
import struct
import zipfile
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple

import numpy as np

from cnnjax import safe_pickle
from cnnjax.errors import UserError

_LEGACY_MAGIC = 0x1950a86a20f9469cfc6c
_LEGACY_PROTOCOL = 1001


class _StorageType(NamedTuple):
  """A torch storage class and the numpy type code of its elements (bfloat16 as its
  uint16 bits)."""
  name: str
  code: str


_STORAGE_TYPES = {name: _StorageType(name, code) for name, code in [
    ("DoubleStorage", "f8"), ("FloatStorage", "f4"), ("HalfStorage", "f2"),
    ("BFloat16Storage", "u2"), ("LongStorage", "i8"), ("IntStorage", "i4"),
    ("ShortStorage", "i2"), ("CharStorage", "i1"), ("ByteStorage", "u1"),
    ("BoolStorage", "?")]}
_UNTYPED = _StorageType("UntypedStorage", "u1")  # bytes, as torch.load reads it


class _Storage(NamedTuple):
  """A storage reference: ``key`` names its data, ``offset`` (elements) is where a legacy
  storage view starts in it."""
  key: str
  type: _StorageType
  offset: int = 0


class _Tensor(NamedTuple):
  """A tensor as pickled: ``size[i]`` elements along dim i, ``stride[i]`` apart, from
  element ``offset`` of the storage."""
  storage: _Storage
  offset: int
  size: tuple[int, ...]
  stride: tuple[int, ...]


def _allowed(source: str) -> dict[tuple[str, str], Any]:
  """The globals a state_dict pickle may name. The functions are made afresh for each
  file: a pickle's BUILD opcode can set their attributes, and must not reach the next."""

  def rebuild_tensor(storage, offset, size, stride):
    return _Tensor(storage, offset, tuple(size), tuple(stride))

  def rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks, metadata=None):
    del requires_grad, hooks
    if metadata:
      raise UserError(f"{source} has a tensor with metadata {metadata!r}; expected plain "
                      "tensors (no conjugate or negative views)")
    return rebuild_tensor(storage, offset, size, stride)

  def rebuild_parameter(data, requires_grad, hooks):
    del requires_grad, hooks
    return data

  def device(*args):  # torch.device('cuda', 0) -> 'cuda:0'
    return ":".join(map(str, args))

  return {
      ("collections", "OrderedDict"): OrderedDict,
      ("torch._utils", "_rebuild_tensor"): rebuild_tensor,
      ("torch._utils", "_rebuild_tensor_v2"): rebuild_tensor_v2,
      ("torch._utils", "_rebuild_parameter"): rebuild_parameter,
      ("torch", "device"): device,
      ("torch.storage", "UntypedStorage"): _UNTYPED,
      **{("torch", name): storage_type for name, storage_type in _STORAGE_TYPES.items()},
  }


def _persistent_load(source: str, found: dict[str, tuple[_StorageType, int]]
                     ) -> Callable[[Any], _Storage]:
  """Resolves a storage's persistent id (zip: ``('storage', type, key, location, numel)``;
  legacy: the same and a view ``(view_key, offset, numel)`` or None), recording each key's
  type and element count in ``found``."""

  def load(saved_id: Any) -> _Storage:
    if not (isinstance(saved_id, tuple) and len(saved_id) in (5, 6)
            and saved_id[0] == "storage" and isinstance(saved_id[1], _StorageType)):
      raise UserError(f"{source} holds the persistent object {str(saved_id)[:80]}; "
                      "expected tensor storages")
    _, storage_type, key, _, numel, *view = saved_id
    found[str(key)] = storage_type, int(numel)
    offset = view[0][1] if view and view[0] is not None else 0
    return _Storage(str(key), storage_type, int(offset))

  return load


def _array(tensor: _Tensor, data: np.ndarray, source: str, name: str) -> np.ndarray:
  """A new array of the tensor's elements in ``data`` (its storage, 1-D); floating types
  (bfloat16 too) as float32, others in their numpy dtype, native byte order."""
  offset, size, stride = tensor.storage.offset + tensor.offset, tensor.size, tensor.stride
  if not (len(size) == len(stride)
          and all(isinstance(v, int) and v >= 0 for v in (offset, *size, *stride))
          and (0 in size or offset + sum((n - 1) * s for n, s in zip(size, stride)) < data.size)):
    raise UserError(f"{source} entry {name!r} has size {list(size)}, stride {list(stride)} "
                    f"and offset {offset}; expected a view within its storage of "
                    f"{data.size} elements")
  if 0 in size:
    view = np.zeros(size, data.dtype)
  else:
    view = np.lib.stride_tricks.as_strided(data[offset:], size,
                                           [s * data.itemsize for s in stride])
  if tensor.storage.type.name == "BFloat16Storage":
    return (view.astype(np.uint32) << 16).view(np.float32)
  return np.array(view, np.float32 if view.dtype.kind == "f" else view.dtype.newbyteorder("="))


def _state_dict(obj: Any, storages: dict[str, np.ndarray], source: str
                ) -> dict[str, np.ndarray]:
  if not isinstance(obj, dict):
    raise UserError(f"{source} holds a {type(obj).__name__}; expected a state_dict "
                    "(a mapping of names to tensors)")
  out = {}
  for name, value in obj.items():
    if not isinstance(value, _Tensor):
      raise UserError(f"{source} entry {name!r} is a {type(value).__name__}; expected a flat "
                      "state_dict of tensors (pass the model's state_dict, not a checkpoint)")
    if value.storage.key not in storages:
      raise UserError(f"{source} entry {name!r} refers to storage {value.storage.key!r}, "
                      "which the file does not hold")
    out[str(name)] = _array(value, storages[value.storage.key], source, name)
  return out


def _check_size(source: str, key: str, nbytes: int, storage_type: _StorageType,
                numel: int) -> None:
  expected = numel * np.dtype(storage_type.code).itemsize
  if nbytes != expected:
    raise UserError(f"{source} storage {key!r} has {nbytes} bytes; expected {expected} "
                    f"({numel} x {storage_type.name})")


def _read_zip(archive: zipfile.ZipFile, source: str) -> dict[str, np.ndarray]:
  pickles = [n for n in archive.namelist() if n.count("/") == 1 and n.endswith("/data.pkl")]
  if len(pickles) != 1:
    raise UserError(f"{source} is a zip archive with {len(pickles)} <name>/data.pkl records; "
                    "expected one (a torch.save file)")
  prefix = pickles[0][:-len("data.pkl")]
  order = "little"
  if prefix + "byteorder" in archive.namelist():
    order = archive.read(prefix + "byteorder").decode("ascii", "replace")
    if order not in ("little", "big"):
      raise UserError(f"{source} has byteorder {order[:20]!r}; expected 'little' or 'big'")
  found: dict[str, tuple[_StorageType, int]] = {}
  with archive.open(pickles[0]) as f:
    obj = safe_pickle.load(f, _allowed(source), source,
                           persistent_load=_persistent_load(source, found), encoding="utf-8")
  storages = {}
  for key, (storage_type, numel) in found.items():
    raw = archive.read(f"{prefix}data/{key}")
    _check_size(source, key, len(raw), storage_type, numel)
    storages[key] = np.frombuffer(raw, ("<" if order == "little" else ">") + storage_type.code)
  return _state_dict(obj, storages, source)


def _read_legacy(f: BinaryIO, size: int, source: str) -> dict[str, np.ndarray]:
  try:
    magic = safe_pickle.load(f, {}, source)
  except UserError:
    magic = None
  if magic != _LEGACY_MAGIC:
    raise UserError(f"{source} is not a torch file; expected a zip archive or the legacy "
                    f"format (magic number {_LEGACY_MAGIC:#x})")
  protocol = safe_pickle.load(f, {}, source)
  if protocol != _LEGACY_PROTOCOL:
    raise UserError(f"{source} has legacy protocol version {protocol!r}; "
                    f"expected {_LEGACY_PROTOCOL}")
  safe_pickle.load(f, {}, source)  # system info: the data is little-endian regardless
  found: dict[str, tuple[_StorageType, int]] = {}
  obj = safe_pickle.load(f, _allowed(source), source,
                         persistent_load=_persistent_load(source, found), encoding="utf-8")
  storages = {}
  for key in safe_pickle.load(f, {}, source):
    if key not in found:
      raise UserError(f"{source} stores storage {key!r}, which no tensor names")
    storage_type, numel = found[key]
    header = f.read(8)
    count = struct.unpack("<q", header)[0] if len(header) == 8 else -1
    nbytes = count * np.dtype(storage_type.code).itemsize
    if count < 0 or count != numel or nbytes > size - f.tell():
      raise UserError(f"{source} is truncated or corrupt at storage {key!r}: {count} elements "
                      f"stored, {numel} expected, {size - f.tell()} bytes left")
    storages[key] = np.frombuffer(f.read(nbytes), "<" + storage_type.code)
  return _state_dict(obj, storages, source)


def read(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """The state_dict in a ``torch.save`` file: name -> array (floating types as float32,
  others in their numpy dtype), without torch.

  Raises:
    UserError: one line naming the file: unreadable, not a state_dict, or naming any global
      other than torch's tensor and storage types (never resolved, so never run).
  """
  path = Path(path)
  source = str(path)
  try:
    with open(path, "rb") as f:
      if f.read(4) == b"PK\x03\x04":
        with zipfile.ZipFile(f) as archive:
          return _read_zip(archive, source)
      f.seek(0)
      return _read_legacy(f, path.stat().st_size, source)
  except UserError:
    raise
  except Exception as e:  # noqa: BLE001 - any parse failure is a bad file
    text = str(e).strip().splitlines()
    raise UserError(f"cannot read {source} as a torch state_dict: {type(e).__name__}"
                    + (f": {text[0]}" if text else "")) from e
