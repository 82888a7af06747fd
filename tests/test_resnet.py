"""ResNet-18/34/50 and EfficientNet-Lite0 flax models: shapes, parameter counts, BN, dropout.

The parameter counts are those of the reference models (torchvision ``resnet18`` /
``resnet34`` / ``resnet50``;
``efficientnet_lite_pytorch.EfficientNet.from_name('efficientnet-lite0')``),
so no torch is needed here; tests/test_parity_torch.py compares the outputs.
"""
import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnnjax import runtime
from cnnjax.errors import UserError
from cnnjax.models.batch_norm import BatchNorm
from cnnjax.models.efficientnet import DepthwiseConv, EfficientNetLite, MBConv, round_filters
from cnnjax.models.resnet import (BasicBlock, ResNet, ResNet18, ResNet34, ResNet50,
                                  conv_kernel_init)

KEY = jax.random.key(0)


def _shapes(model, input_shape, train=False):
  """Abstract logits and intermediates of ``model`` on zeros of ``input_shape``."""
  x = jnp.zeros(input_shape, jnp.float32)
  variables = jax.eval_shape(lambda: model.init(KEY, x, train=False))

  def apply(variables):
    return model.apply(variables, x, train=train, mutable=["intermediates", "batch_stats"],
                       rngs={"dropout": KEY})

  logits, state = jax.eval_shape(apply, variables)
  return logits, {k: v[0].shape for k, v in state["intermediates"].items()}


def _num_params(model) -> int:
  variables = jax.eval_shape(lambda: model.init(KEY, jnp.zeros((1, 32, 32, 3)), train=False))
  return sum(leaf.size for leaf in jax.tree.leaves(variables["params"]))


@pytest.mark.parametrize("model, expected", [
    (ResNet18(), 11_689_512),
    (ResNet34(), 21_797_672),
    (ResNet18(num_classes=0), 11_689_512 - 512 * 1000 - 1000),
    (ResNet50(), 25_557_032),
    (ResNet50(num_classes=0), 25_557_032 - 2048 * 1000 - 1000),
    (EfficientNetLite(), 4_652_008),
    (EfficientNetLite(num_classes=0), 4_652_008 - 1280 * 1000 - 1000),
])
def test_parameter_counts_equal_the_references(model, expected):
  assert _num_params(model) == expected


@pytest.mark.parametrize("cls", [ResNet18, ResNet34])
def test_resnet_shapes_imagenet_stem(cls):
  logits, inter = _shapes(cls(num_classes=7), (2, 96, 96, 3), train=True)
  chex.assert_shape(logits, (2, 7))
  assert inter == {"stem": (2, 24, 24, 64), "stage1": (2, 24, 24, 64),
                   "stage2": (2, 12, 12, 128), "stage3": (2, 6, 6, 256),
                   "stage4": (2, 3, 3, 512), "features": (2, 512)}


def test_resnet50_bottleneck_shapes():
  logits, inter = _shapes(ResNet50(num_classes=7), (2, 64, 64, 3), train=True)
  chex.assert_shape(logits, (2, 7))
  assert inter == {"stem": (2, 16, 16, 64), "stage1": (2, 16, 16, 256),
                   "stage2": (2, 8, 8, 512), "stage3": (2, 4, 4, 1024),
                   "stage4": (2, 2, 2, 2048), "features": (2, 2048)}


def test_resnet_cifar_stem_keeps_32x32_and_feature_mode_returns_pooled():
  logits, inter = _shapes(ResNet18(num_classes=10, cifar_stem=True), (2, 32, 32, 3))
  chex.assert_shape(logits, (2, 10))
  assert inter["stem"] == (2, 32, 32, 64) and inter["stage4"] == (2, 4, 4, 512)
  features, _ = _shapes(ResNet18(num_classes=0, cifar_stem=True), (2, 32, 32, 3))
  chex.assert_shape(features, (2, 512))


@pytest.mark.slow
def test_efficientnet_lite0_shapes():
  logits, inter = _shapes(EfficientNetLite(num_classes=5), (2, 96, 96, 3), train=True)
  chex.assert_shape(logits, (2, 5))
  assert inter == {
      "stem": (2, 48, 48, 32), "stage1": (2, 48, 48, 16), "stage2": (2, 24, 24, 24),
      "stage3": (2, 12, 12, 40), "stage4": (2, 6, 6, 80), "stage5": (2, 6, 6, 112),
      "stage6": (2, 3, 3, 192), "stage7": (2, 3, 3, 320), "head": (2, 3, 3, 1280),
      "features": (2, 1280)}
  features, _ = _shapes(EfficientNetLite(num_classes=0), (2, 64, 64, 3))
  chex.assert_shape(features, (2, 1280))


def test_efficientnet_lite_keeps_stem_and_head_fixed_when_scaled():
  variables = jax.eval_shape(lambda: EfficientNetLite(
      width_coefficient=1.4, depth_coefficient=1.8).init(KEY, jnp.zeros((1, 32, 32, 3))))
  params = variables["params"]
  assert params["conv_stem"]["kernel"].shape == (3, 3, 3, 32)
  assert params["conv_head"]["kernel"].shape == (1, 1, round_filters(320, 1.4), 1280)
  # stage repeats 1, 4, 4, 6, 6, 8, 1 (first and last not scaled)
  assert len([k for k in params if k.startswith("blocks_")]) == 30
  assert round_filters(16, 1.4) == 24 and round_filters(40, 1.1) == 48


@pytest.mark.parametrize("model, bad_input, message", [
    (ResNet18(), (32, 32, 3), "expected NHWC"),
    (ResNet18(num_classes=-1), (1, 32, 32, 3), "num_classes=-1"),
    (EfficientNetLite(), (32, 32, 3), "expected NHWC"),
    (EfficientNetLite(num_classes=-2), (1, 32, 32, 3), "num_classes=-2"),
])
def test_bad_input_raises_user_error(model, bad_input, message):
  with pytest.raises(UserError, match=message):
    jax.eval_shape(lambda: model.init(KEY, jnp.zeros(bad_input)))


@pytest.mark.slow
def test_resnet_batchnorm_momentum_is_torch_0_1_and_eval_uses_running_stats():
  # One stage of one block: the same ResNet code as ResNet18, compiled in a second.
  model = ResNet(stage_sizes=(1,), block_cls=BasicBlock, num_classes=3, cifar_stem=True)
  x = jax.random.normal(KEY, (4, 8, 8, 3))

  @jax.jit
  def run(x):
    variables = model.init(KEY, x)
    _, state = model.apply(variables, x, train=True, mutable=["batch_stats", "intermediates"],
                           capture_intermediates=lambda m, _: m.scope.path == ("conv1",))
    new = {"params": variables["params"], "batch_stats": state["batch_stats"]}
    return variables, state, model.apply(variables, x), model.apply(new, x)

  variables, state, logits_before, logits_after = run(x)
  conv1 = state["intermediates"]["conv1"]["__call__"][0]
  np.testing.assert_allclose(state["batch_stats"]["bn1"]["mean"],
                             0.1 * conv1.mean(axis=(0, 1, 2)), rtol=1e-5, atol=1e-6)
  assert not np.allclose(state["batch_stats"]["layer1_0"]["bn2"]["var"],
                         variables["batch_stats"]["layer1_0"]["bn2"]["var"])
  chex.assert_shape(logits_after, (4, 3))
  assert not np.allclose(logits_before, logits_after)  # eval reads the running stats


@pytest.mark.parametrize("kernels", ["onednn", "taps"])
@pytest.mark.parametrize("height, width, kernel, strides", [
    (16, 16, 3, 2), (15, 17, 5, 2), (7, 7, 5, 1)])
def test_depthwise_conv_equals_flax_grouped_conv(height, width, kernel, strides, kernels,
                                                 monkeypatch):
  """Values and gradients, on oneDNN's grouped convolution and as the sum of taps."""
  if kernels == "taps":
    monkeypatch.setattr(runtime, "_onednn", False)
  elif not runtime.onednn_in_use():
    pytest.skip("oneDNN's kernels are not in use here")
  x = jax.random.normal(KEY, (2, height, width, 6))
  grouped = nn.Conv(6, (kernel, kernel), strides=(strides, strides), feature_group_count=6,
                    padding="SAME", use_bias=False, kernel_init=conv_kernel_init)  # lax's
  ours = DepthwiseConv(kernel, strides)
  variables = jax.jit(grouped.init)(KEY, x)
  np.testing.assert_array_equal(jax.jit(ours.init)(KEY, x)["params"]["kernel"],
                                variables["params"]["kernel"])
  cotangent = jax.random.normal(jax.random.key(1), grouped.apply(variables, x).shape)

  def value_and_grads(module):
    loss = lambda v, x: jnp.sum(module.apply(v, x) * cotangent)
    return jax.jit(jax.value_and_grad(loss, (0, 1)))(variables, x)

  (want, want_grads), (got, got_grads) = value_and_grads(grouped), value_and_grads(ours)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
  for g, w in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads)):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-4)
  on_onednn = "cnnjax_onednn_conv" in str(jax.make_jaxpr(ours.apply)(variables, x))
  assert on_onednn == (kernels == "onednn")


@pytest.mark.slow
def test_mbconv_drop_connect_drops_whole_residual_branches_while_training():
  x = jax.random.normal(KEY, (32, 4, 4, 8))

  def block(rate):
    return MBConv(features=8, kernel_size=3, strides=1, expand_ratio=2, drop_rate=rate,
                  conv=functools.partial(nn.Conv, use_bias=False),
                  norm=functools.partial(BatchNorm, use_running_average=False))

  @jax.jit
  def run(x):
    variables = block(0.0).init(KEY, x, train=True)
    apply = lambda rate, train: block(rate).apply(  # noqa: E731
        variables, x, train=train, mutable=["batch_stats"],
        rngs={"dropout": jax.random.key(1)})[0]
    return apply(0.0, True), apply(0.5, True), apply(0.5, False)

  x, full, dropped, evaluated = map(np.asarray, (x, *run(x)))
  branch = full - x
  kept = np.array([np.allclose(d, xi + 2 * b, atol=1e-5)
                   for d, xi, b in zip(dropped, x, branch)])
  skipped = np.array([np.allclose(d, xi) for d, xi in zip(dropped, x)])
  assert np.all(kept ^ skipped) and kept.any() and skipped.any()
  np.testing.assert_allclose(evaluated, full, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("model", [EfficientNetLite(), EfficientNetLite(num_classes=0)])
def test_efficientnet_dropout_uses_the_dropout_rng_only_while_training(model):
  x = jnp.zeros((2, 32, 32, 3))
  variables = jax.eval_shape(lambda: model.init(KEY, x))
  jax.eval_shape(lambda v: model.apply(v, x, train=False), variables)  # no rng needed
  with pytest.raises(Exception, match="dropout"):
    jax.eval_shape(lambda v: model.apply(v, x, train=True, mutable=["batch_stats"]), variables)
