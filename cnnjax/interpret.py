"""Looking inside a trained CNN: activations, filters, preferred inputs, CAM and Grad-CAM.

Layers are named by module path, ``'/'``-joined (``'ConvBlock_1'``, ``'ConvBlock_1/Conv_0'``,
``'layer4_1'``, ``'layer4_1/conv2'``): the output of that module's ``__call__`` (a ``Conv``
with ``relu=True``, as in BNCNN, LeNet and the course's blocks, or a ``BatchNorm`` with an
``activation``, as ResNet's and EfficientNet-Lite's: after the activation). Outputs are
captured and perturbed with ``flax.linen.intercept_methods``, so any model works as it is,
without being copied or changed; ``list_layers`` names every layer of a model.

Every function takes the model's ``apply`` (``model.apply`` or ``state.apply_fn``), its
variables (``{'params', 'batch_stats'}``) and normalised float images ``[H, W, C]`` (one
image) or ``[N, H, W, C]``, and runs the model in inference mode (``train=False``).
Images come back as float arrays in ``[0, 1]`` for ``plots.image_grid``. A model with one
output (``loss='binary_cross_entropy'``) has classes 0 and 1: class 1 is explained by its
logit, class 0 by the negated logit.
"""
import contextlib
import dataclasses
import os
import pathlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import optax

from cnnjax import assemble, plots
from cnnjax.models import batch_norm
from cnnjax.steps import model_variables, predict_proba
from cnnjax.errors import UserError

Variables = dict[str, Any]
ApplyFn = Callable[..., Any]  # model.apply, or a train state's apply_fn
_PERTURBATION = "interpret"  # name of the perturbation added to the chosen layer's output


@dataclasses.dataclass(frozen=True)
class Layer:
  """One module call of a model.

  Attributes:
    path: the module path, ``'/'``-joined.
    module_type: the module's class (e.g. ``nn.Conv``).
    shape: the output shape for one image without the batch axis, e.g. ``(16, 16, 8)``.
  """
  path: str
  module_type: type
  shape: tuple[int, ...]

  @property
  def is_feature_map(self) -> bool:
    """True for ``[H, W, C]`` outputs, the layers of activations and Grad-CAM."""
    return len(self.shape) == 3


def _path(module: nn.Module) -> str:
  return "/".join(module.path)


@contextlib.contextmanager
def _after_calls(hook: Callable[[nn.Module, tuple[Any, ...], Any], Any]) -> Iterator[None]:
  """Within the block, ``hook(module, args, output)`` runs after the ``__call__`` of every
  submodule (not the top-level model) and its return value replaces the output: the
  outermost call's (a ``BatchNorm`` calls ``nn.BatchNorm.__call__`` before its activation);
  batch norms run apart from their convolutions (``batch_norm.unfolded``), so that both are
  seen."""
  calling: set[tuple[str, ...]] = set()

  def interceptor(next_fun, args, kwargs, context):
    if context.method_name != "__call__":
      return next_fun(*args, **kwargs)
    path = tuple(context.module.path)
    if not path or path in calling:
      return next_fun(*args, **kwargs)
    calling.add(path)
    try:
      out = next_fun(*args, **kwargs)
    finally:
      calling.discard(path)
    return hook(context.module, args, out)
  with nn.intercept_methods(interceptor), batch_norm.unfolded():
    yield


def _outputs(apply_fn: ApplyFn, variables: Variables, images: jax.Array,
             paths: Sequence[str]) -> tuple[jax.Array, dict[str, jax.Array]]:
  """``(logits [N, K], {path: output [N, ...]})`` for the first call of each of ``paths``."""
  captured: dict[str, jax.Array] = {}

  def record(module: nn.Module, args: tuple[Any, ...], out: Any) -> Any:
    del args
    if _path(module) in paths:
      captured.setdefault(_path(module), out)
    return out

  with _after_calls(record):
    logits = apply_fn(variables, images, train=False)
  return logits, captured


def list_layers(apply_fn: ApplyFn, variables: Variables, image_shape: Sequence[int]) -> list[Layer]:
  """Every submodule call of the model on an image ``[H, W, C]``, in call order (a module
  called twice is listed once, for its first call). Nothing is computed: shapes only."""
  layers: dict[str, Layer] = {}

  def record(module: nn.Module, args: tuple[Any, ...], out: Any) -> Any:
    del args
    if hasattr(out, "shape") and _path(module) not in layers:
      layers[_path(module)] = Layer(_path(module), type(module), tuple(out.shape[1:]))
    return out

  with _after_calls(record):
    jax.eval_shape(lambda v, x: apply_fn(v, x, train=False), variables,
                   jnp.zeros((1, *image_shape), jnp.float32))
  return list(layers.values())


def top_level_conv_layers(layers: Sequence[Layer]) -> list[str]:
  """Paths of the top-level feature-map layers that are or contain a convolution, in call
  order: e.g. ``ConvBlock_0, ConvBlock_1`` (SeedCNN), ``conv1, layer1_0 .. layer4_1``
  (ResNet-18). The last one is the usual choice for Grad-CAM."""
  convs = [l.path for l in layers if issubclass(l.module_type, nn.Conv)]
  return [l.path for l in layers if "/" not in l.path and l.is_feature_map
          and any(c == l.path or c.startswith(l.path + "/") for c in convs)]


def feature_map(layers: Sequence[Layer], name: str) -> Layer:
  """The feature-map layer called ``name``, or a one-line error listing the valid names."""
  for layer in layers:
    if layer.path == name and layer.is_feature_map:
      return layer
  valid = [l.path for l in layers if l.is_feature_map]
  raise UserError(f"unknown layer {name!r}; expected a module path with an [H, W, C] output, "
                  f"one of {valid}")


def _class_sign(num_outputs: int, class_id: int) -> tuple[int, float]:
  """``(output index, sign)`` whose signed logit scores ``class_id``: the class's own
  logit, or for one sigmoid output ``+logit`` (class 1) and ``-logit`` (class 0)."""
  num_classes = max(num_outputs, 2)
  if not 0 <= class_id < num_classes:
    raise UserError(f"class {class_id}; expected a class id in [0, {num_classes})")
  if num_outputs == 1:
    return 0, 1.0 if class_id == 1 else -1.0
  return class_id, 1.0


def _params_at(params: Any, path: str) -> Any:
  for key in path.split("/"):
    params = params[key]
  return params


def activations(apply_fn: ApplyFn, variables: Variables, image: jax.Array,
                layers: Sequence[str]) -> dict[str, np.ndarray]:
  """The outputs ``[h, w, c]`` of the feature-map ``layers`` for one image ``[H, W, C]``."""
  known = list_layers(apply_fn, variables, image.shape)
  for name in layers:
    feature_map(known, name)
  run = jax.jit(lambda v, x: _outputs(apply_fn, v, x, tuple(layers))[1])
  return {name: np.asarray(out[0]) for name, out in run(variables, image[None]).items()}


def _unit_range(x: np.ndarray, axes: tuple[int, ...]) -> np.ndarray:
  """``x`` scaled to ``[0, 1]`` by its min and max over ``axes`` (0 where constant)."""
  x = np.asarray(x, np.float64)
  low = x.min(axis=axes, keepdims=True)
  span = x.max(axis=axes, keepdims=True) - low
  return np.divide(x - low, span, out=np.zeros_like(x), where=span > 0)


def activation_panels(acts: np.ndarray) -> np.ndarray:
  """Every channel of a layer output ``[h, w, c]`` as a grey image: ``[c, h, w, 1]`` in
  ``[0, 1]``, each channel scaled by its own min and max (a constant channel is 0)."""
  return _unit_range(np.moveaxis(np.asarray(acts), -1, 0)[..., None], (1, 2, 3))


def to_unit_range(images: np.ndarray) -> np.ndarray:
  """Images ``[N, H, W, C]`` (e.g. ``Patterns.images``) scaled to ``[0, 1]`` one by one."""
  return _unit_range(images, (1, 2, 3))


def first_layer_filters(apply_fn: ApplyFn, variables: Variables,
                        image_shape: Sequence[int]) -> tuple[str, np.ndarray]:
  """The kernels of the first convolution applied to the image, as images.

  Returns:
    ``(path, filters)``: ``filters`` is ``[C_out, kh, kw, C_in]`` in ``[0, 1]``, each
    filter scaled by its own min and max over all its input channels (so an RGB
    filter keeps its colours).
  """
  convs = [l.path for l in list_layers(apply_fn, variables, image_shape)
           if issubclass(l.module_type, nn.Conv)]
  if not convs:
    raise UserError("the model has no convolution; expected a CNN")
  kernel = np.asarray(_params_at(variables["params"], convs[0])["kernel"])  # [kh, kw, C_in, C_out]
  return convs[0], to_unit_range(np.moveaxis(kernel, -1, 0))


def grad_cam(apply_fn: ApplyFn, variables: Variables, image: jax.Array, layer: str,
             class_id: int) -> np.ndarray:
  """Grad-CAM (Selvaraju et al. 2017) of ``class_id`` at ``layer`` for one image ``[H, W, C]``.

  The gradient of the class logit with respect to the layer's activations ``A``
  ``[h, w, c]`` is taken through ``nn.Module.perturb`` (a zero perturbation added to the
  layer's output); its spatial mean weights each channel:
  ``relu(sum_c mean_hw(dlogit / dA_c) * A_c)``.

  Returns:
    ``[h, w]`` non-negative heat at the layer's resolution (``upsample`` for the image's).
  """
  target = feature_map(list_layers(apply_fn, variables, image.shape), layer)
  logits_shape = jax.eval_shape(lambda v, x: apply_fn(v, x, train=False), variables, image[None])
  index, sign = _class_sign(logits_shape.shape[-1], class_id)
  zeros = {_PERTURBATION: jnp.zeros((1, *target.shape), jnp.float32)}
  for key in reversed(layer.split("/")):  # the perturbation's place in the collection
    zeros = {key: zeros}

  def class_logit(perturbations: Any) -> tuple[jax.Array, jax.Array]:
    acts = []

    def perturb(module: nn.Module, args: tuple[Any, ...], out: Any) -> Any:
      del args
      if _path(module) == layer and not acts:
        out = module.perturb(_PERTURBATION, out)
        acts.append(out[0])
      return out

    with _after_calls(perturb):
      logits = apply_fn({**variables, "perturbations": perturbations}, image[None], train=False)
    return sign * logits[0, index], acts[0]

  grads, acts = jax.jit(jax.grad(class_logit, has_aux=True))(zeros)
  weights = jax.tree.leaves(grads)[0][0].mean(axis=(0, 1))  # [c]
  return np.asarray(jax.nn.relu(acts @ weights))


def class_activation_map(apply_fn: ApplyFn, variables: Variables, image: jax.Array,
                         class_id: int) -> np.ndarray:
  """CAM (Zhou et al. 2016) of ``class_id`` for one image ``[H, W, C]``, for models that
  global-average-pool a feature map into their last dense layer.

  The model must sow (``'intermediates'``) that feature map ``F`` ``[h, w, c]`` (ResNet's
  ``stage4``, EfficientNet's ``head``); the dense kernel ``W`` ``[c, K]`` then gives
  ``F @ W[:, class_id]``, whose mean plus the class's bias is the class logit.

  Returns:
    ``[h, w]``, signed (``upsample`` keeps the positive part).
  """
  dense = [l for l in list_layers(apply_fn, variables, image.shape)
           if issubclass(l.module_type, nn.Dense)]
  not_gap = ("; CAM needs a model that global-average-pools a sown feature map into its last "
             "dense layer, such as resnet18 (use Grad-CAM for others)")
  if not dense:
    raise UserError(f"the model has no dense layer{not_gap}")
  head = dense[-1].path
  kernel = np.asarray(_params_at(variables["params"], head)["kernel"])  # [c, K]
  index, sign = _class_sign(kernel.shape[-1], class_id)

  def run(v: Variables, x: jax.Array) -> tuple[jax.Array, list[jax.Array]]:
    """The head's input ``[c]`` and the sown feature maps ``[1, h, w, c]``."""
    inputs = []

    def record(module: nn.Module, args: tuple[Any, ...], out: Any) -> Any:
      if _path(module) == head and not inputs:
        inputs.append(args[0][0])
      return out

    with _after_calls(record):
      _, state = apply_fn(v, x, train=False, mutable=["intermediates"])
    maps = [m for m in jax.tree.leaves(state.get("intermediates", {}))
            if m.ndim == 4 and m.shape[-1] == kernel.shape[0]]
    return inputs[0], maps

  if not jax.eval_shape(run, variables, image[None])[1]:  # nothing to compute with
    raise UserError(f"the model sows no [h, w, {kernel.shape[0]}] feature map for {head!r}{not_gap}")
  pooled, maps = jax.jit(run)(variables, image[None])
  matches = [np.asarray(m[0]) for m in maps
             if np.allclose(m[0].mean(axis=(0, 1)), pooled, rtol=1e-4, atol=1e-5)]
  if not matches:
    raise UserError(f"no sown feature map averages to the input of {head!r}{not_gap}")
  return sign * matches[0] @ kernel[:, index]


@dataclasses.dataclass(frozen=True)
class Patterns:
  """Inputs found by gradient ascent, one per channel.

  Attributes:
    images: ``[N, H, W, C]`` in normalised input units.
    start, end: ``[N]`` the mean activation of each target channel for the starting noise
      and for the final image (without jitter).
  """
  images: np.ndarray
  start: np.ndarray
  end: np.ndarray


def preferred_patterns(apply_fn: ApplyFn, variables: Variables, image_shape: Sequence[int],
                       layer: str, channels: Sequence[int], *, steps: int = 100,
                       lr: float = 0.05, l2: float = 1e-2, jitter: int = 2,
                       seed: int = 0) -> Patterns:
  """The input each channel of ``layer`` responds to most, by gradient ascent.

  From small seeded noise, Adam maximises ``mean_hw(A_c(roll(x))) - l2 * mean(x**2)`` for
  each channel ``c``, where ``roll`` shifts the image by up to ``jitter`` pixels (a new
  random shift every step): with the L2 penalty this keeps the pattern from turning into
  high-frequency noise. The channels are optimised together as one batch (batch norm is
  in inference mode, so the images do not interact).

  Args:
    image_shape: ``[H, W, C]`` of the model's input.
    layer: a feature-map layer (see ``list_layers``).
    channels: the channel ids to visualise.
    steps, lr: Adam steps and learning rate.
    l2: weight of the mean squared input.
    jitter: the largest shift in pixels (0: none).
    seed: the starting noise and the shifts.
  """
  target = feature_map(list_layers(apply_fn, variables, image_shape), layer)
  ids = np.asarray(channels, np.int64)
  if ids.ndim != 1 or not len(ids) or ((ids < 0) | (ids >= target.shape[-1])).any():
    raise UserError(f"channels {list(channels)} of layer {layer!r}; expected ids in "
                    f"[0, {target.shape[-1]})")

  def channel_means(x: jax.Array) -> jax.Array:  # [N]
    acts = _outputs(apply_fn, variables, x, (layer,))[1][layer]  # [N, h, w, c]
    return jnp.take_along_axis(acts.mean(axis=(1, 2)), jnp.asarray(ids)[:, None], axis=1)[:, 0]

  def loss(x: jax.Array, shift: jax.Array) -> jax.Array:
    shifted = jnp.roll(x, (shift[0], shift[1]), axis=(1, 2))
    return -channel_means(shifted).sum() + l2 * (x ** 2).mean(axis=(1, 2, 3)).sum()

  tx = optax.adam(lr)

  @jax.jit
  def ascend(x: jax.Array, key: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    def step(carry, key):
      x, opt_state = carry
      shift = jax.random.randint(key, (2,), -jitter, jitter + 1)
      updates, opt_state = tx.update(jax.grad(loss)(x, shift), opt_state)
      return (optax.apply_updates(x, updates), opt_state), None
    (end, _), _ = jax.lax.scan(step, (x, tx.init(x)), jax.random.split(key, steps))
    return end, channel_means(x), channel_means(end)

  noise_key, shift_key = jax.random.split(jax.random.PRNGKey(seed))
  x0 = 0.1 * jax.random.normal(noise_key, (len(ids), *image_shape))
  return Patterns(*(np.asarray(a) for a in ascend(x0, shift_key)))


def upsample(heat: np.ndarray, size: Sequence[int]) -> np.ndarray:
  """A heat map ``[h, w]`` resized (bilinear) to ``size`` ``(H, W)``, negative values
  cut to 0, divided by its maximum: ``[H, W]`` in ``[0, 1]``."""
  heat = jax.image.resize(jnp.asarray(heat, jnp.float32), tuple(size), "bilinear")
  heat = np.maximum(np.asarray(heat, np.float64), 0.0)
  peak = heat.max()
  return heat / peak if peak > 0 else heat


def as_rgb(image: np.ndarray) -> np.ndarray:
  """An image ``[H, W, C]`` (uint8, or float in ``[0, 1]``; C 1 or 3) as float RGB
  ``[H, W, 3]`` in ``[0, 1]``."""
  image = np.asarray(image)
  image = image / 255.0 if image.dtype == np.uint8 else image.astype(np.float64)
  return np.repeat(image, 3, axis=-1) if image.shape[-1] == 1 else image


def overlay(image: np.ndarray, heat: np.ndarray, alpha: float = 0.5) -> np.ndarray:
  """A heat map ``[h, w]`` (``upsample``d) in the 'jet' colours over an image ``[H, W, C]``
  (as for ``as_rgb``): ``[H, W, 3]`` float in ``[0, 1]``."""
  image = as_rgb(image)
  colours = matplotlib.colormaps["jet"](upsample(heat, image.shape[:2]))[..., :3]
  return (1.0 - alpha) * image + alpha * colours


def _file_name(layer: str) -> str:
  return layer.replace("/", ".")


def write_pictures(workdir: str | os.PathLike, image: int, *, layers: Sequence[str] | None = None,
                   class_id: int | None = None, cam_layer: str | None = None,
                   pattern_layer: str | None = None, num_patterns: int = 16, steps: int = 100,
                   which: str = "best") -> list[pathlib.Path]:
  """All of the above for test image ``image`` of the run in ``workdir``, as PNGs in
  ``workdir/interpret/``.

  Writes ``image{i}_{layer}.png`` (every channel of each of ``layers``; default
  ``top_level_conv_layers``), ``filters_{layer}.png`` (the first convolution's kernels),
  ``patterns_{layer}.png`` (gradient ascent on the first ``num_patterns`` channels of
  ``pattern_layer``; 0 skips it) and ``image{i}_heatmaps.png`` (the image, Grad-CAM at
  ``cam_layer`` and, for global-average-pool models, CAM). The class is ``class_id``, by
  default the predicted one; both layers default to the last top-level conv layer. A
  ``'/'`` in a layer's path becomes ``'.'`` in file names.

  Returns:
    The paths written.
  """
  s = assemble.restore(workdir, which)
  config = s.config
  if config.extract_features:
    raise UserError(f"the run in {workdir} trained a head on extracted features; expected a "
                    "run whose model sees the images (config.extract_features=False)")
  images, labels = s.images.test
  if not 0 <= image < len(labels):
    raise UserError(f"image {image}; expected a test image index in [0, {len(labels)})")
  apply_fn, variables = s.state.apply_fn, model_variables(s.state)
  x = s.normalize(images[image:image + 1])[0]  # [H, W, C] as the model sees it
  known = list_layers(apply_fn, variables, x.shape)
  convs = top_level_conv_layers(known)
  if not convs and None in (layers, cam_layer, pattern_layer):
    raise UserError("the model has no convolution layer to default to; expected --layers, "
                    "--cam_layer and --pattern_layer")
  layers = convs if layers is None else list(layers)
  cam_layer, pattern_layer = cam_layer or convs[-1], pattern_layer or convs[-1]
  for name in (*layers, cam_layer, pattern_layer):
    feature_map(known, name)
  probs = predict_proba(s.state, s.normalize, images[image:image + 1], s.runner.mesh.size,
                        config.loss, mesh=s.runner.mesh, dtype=s.runner.dtype)[0]
  pred = int(probs.argmax())
  class_id = pred if class_id is None else class_id
  names = s.data.class_names
  _class_sign(len(names), class_id)

  out = pathlib.Path(workdir) / "interpret"
  written = []
  about = f"test image {image} (true {names[labels[image]]}, predicted {names[pred]})"
  for name, acts in activations(apply_fn, variables, x, layers).items():
    panels = activation_panels(acts)
    written.append(plots.image_grid(panels, out / f"image{image}_{_file_name(name)}.png",
                                    titles=[f"channel {c}" for c in range(len(panels))], ncols=16,
                                    title=f"{name}: its {len(panels)} channels on {about}"))
  path, filters = first_layer_filters(apply_fn, variables, x.shape)
  written.append(plots.image_grid(filters, out / f"filters_{_file_name(path)}.png",
                                  titles=[f"filter {c}" for c in range(len(filters))], ncols=16,
                                  title=f"{path}: the first convolution's {len(filters)} kernels"))
  if num_patterns:
    channels = range(min(num_patterns, feature_map(known, pattern_layer).shape[-1]))
    found = preferred_patterns(apply_fn, variables, x.shape, pattern_layer, channels,
                               steps=steps, seed=config.seed)
    written.append(plots.image_grid(
        to_unit_range(found.images), out / f"patterns_{_file_name(pattern_layer)}.png",
        titles=[f"channel {c}: {a:.2g}" for c, a in zip(channels, found.end)], ncols=8,
        title=f"{pattern_layer}: inputs that excite each channel (its mean activation)"))

  panels = [as_rgb(images[image]),
            overlay(images[image], grad_cam(apply_fn, variables, x, cam_layer, class_id))]
  titles = [f"true {names[labels[image]]} / pred {names[pred]} (p={probs[pred]:.2f})",
            f"Grad-CAM {cam_layer}: {names[class_id]}"]
  try:
    panels.append(overlay(images[image], class_activation_map(apply_fn, variables, x, class_id)))
    titles.append(f"CAM: {names[class_id]}")
  except UserError:  # not a global-average-pool model: Grad-CAM only
    pass
  written.append(plots.image_grid(np.stack(panels), out / f"image{image}_heatmaps.png",
                                  titles=titles, ncols=len(panels), cell=3.2,
                                  title=f"Where the model looks: {about}",
                                  colorbar=f"relevance for '{names[class_id]}'"))
  return written
