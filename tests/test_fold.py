"""Batch norms folded into their convolutions in inference (``batch_norm.conv_norm``): the
results of the unfolded models, on oneDNN and on XLA, float32 and bfloat16; interpret still
sees each layer."""
import functools
import re
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnnjax import interpret, optim, runtime, steps
from cnnjax.models import batch_norm
from cnnjax.models.efficientnet import EfficientNetLite
from cnnjax.models.resnet import BasicBlock, Bottleneck, ResNet
from cnnjax.models.vgg import VGG

MODELS = {
    "resnet basic": (ResNet((1, 1), BasicBlock, num_classes=5), (32, 32, 3)),
    "resnet bottleneck, cifar stem": (ResNet((1, 1), Bottleneck, num_classes=5,
                                             cifar_stem=True), (16, 16, 3)),
    "efficientnet-lite0": (EfficientNetLite(num_classes=5), (32, 32, 3)),
    "vgg-bn": (VGG(((16, 1), (32, 2)), num_classes=0, batch_norm=True), (16, 16, 3)),
}


def _variables(model, image_shape):
  """Initial variables with the batch norms' statistics, scales and biases (and the
  convolutions' biases) moved off 0 and 1, so that a wrong fold shows."""
  variables = model.init(jax.random.key(0), jnp.zeros((1, *image_shape)), train=False)

  def move(path, leaf):
    name = path[-1].key
    if name not in ("mean", "var", "scale", "bias"):
      return leaf
    noise = 0.3 * jax.random.normal(jax.random.fold_in(jax.random.key(1), zlib.crc32(str(path).encode())),
                                    leaf.shape)
    return jnp.abs(leaf + noise) + 0.2 if name == "var" else leaf + noise

  return jax.tree_util.tree_map_with_path(move, variables)


def _both(model, variables, images, dtype):
  """(folded, unfolded) inference logits, each traced where it is called."""
  apply = functools.partial(steps.apply_in, dtype, model.apply)
  folded = jax.jit(lambda v, x: apply(v, x, train=False))(variables, images)
  with batch_norm.unfolded():
    unfolded = jax.jit(lambda v, x: apply(v, x, train=False))(variables, images)
  return folded, unfolded


@pytest.mark.parametrize("onednn", [True, False])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("name", MODELS)
def test_folded_inference_equals_the_convolution_then_the_batch_norm(name, dtype, onednn,
                                                                     monkeypatch):
  if onednn and not runtime.onednn_in_use(dtype):
    pytest.skip(f"oneDNN does not run {dtype} here")
  monkeypatch.setattr(runtime, "_onednn", onednn and runtime.onednn_in_use())
  monkeypatch.setattr(runtime, "_onednn_bf16", onednn and runtime.onednn_in_use("bfloat16"))
  model, image_shape = MODELS[name]
  variables = _variables(model, image_shape)
  images = jax.random.normal(jax.random.key(2), (3, *image_shape))
  folded, unfolded = _both(model, variables, images, dtype)
  scale = float(jnp.max(jnp.abs(unfolded)))
  # bfloat16: the folded kernel is rounded, not the convolution's output.
  tolerance = 1e-4 if dtype == "float32" else 0.05
  np.testing.assert_allclose(folded / scale, unfolded / scale, atol=tolerance)


@pytest.mark.skipif(not runtime.onednn_in_use(), reason="oneDNN does not run here")
def test_folded_inference_is_convolutions_with_the_activation_inside():
  model, image_shape = MODELS["efficientnet-lite0"]
  variables = _variables(model, image_shape)
  images = jnp.zeros((2, *image_shape))

  def program(v, x):
    return str(jax.make_jaxpr(lambda v, x: model.apply(v, x, train=False))(v, x))

  folded = program(variables, images)
  with batch_norm.unfolded():
    unfolded = program(variables, images)
  assert "conv_fwd_bias_relu6" in folded and "conv_fwd_bias" not in unfolded
  # The normalisation's (x - mean) on [B, H, W, C] maps, and relu6's clamp.
  for op in ("sub", "min"):
    assert _ops_on_maps(folded, op) == 0 < _ops_on_maps(unfolded, op)


def _ops_on_maps(jaxpr: str, op: str) -> int:
  """How many equations of ``jaxpr`` apply ``op`` and give a 4-D result."""
  return sum(1 for line in jaxpr.splitlines()
             if re.search(rf"f32\[\d+,\d+,\d+,\d+\] = {op} ", line))


def test_training_and_initialisation_run_the_layers_apart():
  model, image_shape = MODELS["resnet basic"]
  variables = _variables(model, image_shape)
  images = jax.random.normal(jax.random.key(3), (4, *image_shape))
  logits, updates = model.apply(variables, images, train=True, mutable=["batch_stats"])
  with batch_norm.unfolded():
    want, want_updates = model.apply(variables, images, train=True, mutable=["batch_stats"])
  np.testing.assert_array_equal(logits, want)
  jax.tree.map(np.testing.assert_array_equal, updates, want_updates)


def test_interpret_sees_each_convolution_and_batch_norm():
  model, image_shape = MODELS["resnet basic"]
  variables = _variables(model, image_shape)
  paths = [layer.path for layer in interpret.list_layers(model.apply, variables, image_shape)]
  assert {"conv1", "bn1", "layer1_0/conv2", "layer1_0/bn2"} <= set(paths)
  image = jax.random.normal(jax.random.key(4), image_shape)
  maps = interpret.activations(model.apply, variables, image, ["layer1_0/conv1", "layer1_0/bn1"])
  assert maps["layer1_0/conv1"].min() < 0 and maps["layer1_0/bn1"].min() == 0  # bn1's ReLU


def test_a_frozen_base_folds_and_keeps_its_statistics_while_the_rest_trains():
  model, image_shape = MODELS["resnet basic"]
  variables = _variables(model, image_shape)
  images = jax.random.normal(jax.random.key(5), (4, *image_shape))
  frozen = optim.frozen_modules(variables["params"], ("(conv1|bn1|layer1_0)/.*:frozen",
                                                       "(layer2_0|fc)/.*:1"))
  assert {("conv1",), ("bn1",), ("layer1_0",)} <= frozen and ("layer2_0",) not in frozen

  def train(v, x):
    with optim.frozen_inference(frozen):
      return model.apply(v, x, train=True, mutable=["batch_stats"])

  def train_unfolded(v, x):  # its own function: jit caches traces by function, not context
    with batch_norm.unfolded():
      return train(v, x)

  logits, updates = jax.jit(train)(variables, images)
  want, want_updates = jax.jit(train_unfolded)(variables, images)
  program = str(jax.make_jaxpr(train)(variables, images))
  assert "conv_fwd_bias" not in str(jax.make_jaxpr(train_unfolded)(variables, images))
  np.testing.assert_allclose(logits, want, rtol=1e-4, atol=1e-4 * float(jnp.max(jnp.abs(want))))
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-4, atol=1e-5), updates,
               want_updates)
  for name in ("bn1", "layer1_0"):  # frozen: the statistics kept
    jax.tree.map(np.testing.assert_array_equal, updates["batch_stats"][name],
                 variables["batch_stats"][name])
  assert not np.allclose(updates["batch_stats"]["layer2_0"]["bn1"]["mean"],
                         variables["batch_stats"]["layer2_0"]["bn1"]["mean"])
  if runtime.onednn_in_use():
    assert program.count("conv_fwd_bias_relu") == 2  # the stem's and layer1_0/conv1's
