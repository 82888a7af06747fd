"""cnnjax.models.conv: every lowering gives lax's values and gradients."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from cnnjax import onednn, runtime
from cnnjax.models import conv

# (x shape, kernel shape, strides, padding), covering every branch of lowering.
CASES = {
    "1x1 strided": ((2, 9, 9, 16), (1, 1, 16, 8), (2, 2), "SAME"),
    "1x1 (XLA)": ((2, 5, 5, 16), (1, 1, 16, 8), (1, 1), "VALID"),
    "2x2 map": ((2, 2, 2, 32), (3, 3, 32, 16), (1, 1), ((1, 1), (1, 1))),
    "stride 2 to 2x2, SAME pads unequal": ((2, 4, 4, 8), (3, 3, 8, 8), (2, 2), "SAME"),
    "RGB first layer (XLA)": ((2, 12, 10, 3), (3, 3, 3, 8), (1, 1), "SAME"),
    "LeNet 5x5 VALID (XLA)": ((2, 14, 14, 6), (5, 5, 6, 16), (1, 1), "VALID"),
    "wide contraction (XLA)": ((2, 8, 8, 32), (3, 3, 32, 8), (1, 1), ((1, 1), (1, 1))),
}
IM2COL = {"1x1 strided": True, "1x1 (XLA)": False, "2x2 map": True, "stride 2 to 2x2, SAME pads unequal": True,
          "RGB first layer (XLA)": False, "LeNet 5x5 VALID (XLA)": False,
          "wide contraction (XLA)": False}


@pytest.fixture(params=["onednn", "without onednn"])
def lowerings(request, monkeypatch):
  """Runs a test with oneDNN (skipped where it is unavailable) and without it."""
  if request.param == "without onednn":
    monkeypatch.setattr(runtime, "_onednn", False)
  elif not runtime.onednn_in_use():
    pytest.skip(f"oneDNN unavailable: {onednn.unavailable_reason()}")
  return request.param


def _pads(x_shape, k_shape, strides, padding):
  if isinstance(padding, str):
    return lax.padtype_to_pads(x_shape[1:3], k_shape[:2], strides, padding)
  return padding


@pytest.mark.slow
@pytest.mark.parametrize("name", CASES)
def test_values_and_gradients_equal_lax(name, lowerings):
  x_shape, k_shape, strides, padding = CASES[name]
  want_lowering = lowerings if lowerings == "onednn" else "im2col" if IM2COL[name] else "xla"
  assert conv.lowering(x_shape, k_shape, strides,
                       _pads(x_shape, k_shape, strides, padding)) == want_lowering
  kx, kk, kg = jax.random.split(jax.random.key(0), 3)
  x, kernel = jax.random.normal(kx, x_shape), jax.random.normal(kk, k_shape)
  dims = ("NHWC", "HWIO", "NHWC")

  def loss(fn, x, kernel):
    y = fn(x, kernel, strides, padding, dimension_numbers=dims)
    return jnp.sum(y * jax.random.normal(kg, y.shape)), y

  (want, y_want), g_want = jax.value_and_grad(
      lambda *a: loss(lax.conv_general_dilated, *a), (0, 1), has_aux=True)(x, kernel)
  (got, y_got), g_got = jax.value_and_grad(
      lambda *a: loss(conv.conv_general_dilated, *a), (0, 1), has_aux=True)(x, kernel)
  np.testing.assert_allclose(y_got, y_want, rtol=1e-5, atol=1e-4)
  for a, b in zip(g_got, g_want):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4)


@pytest.mark.slow
def test_im2col_computes_the_xla_cases_too():
  # The lowering is a choice of speed, not of result: im2col is exact on any NHWC shape.
  for name, (x_shape, k_shape, strides, padding) in CASES.items():
    x = jax.random.normal(jax.random.key(3), x_shape)
    kernel = jax.random.normal(jax.random.key(4), k_shape)
    np.testing.assert_allclose(
        conv.im2col_conv(x, kernel, strides, _pads(x_shape, k_shape, strides, padding)),
        lax.conv_general_dilated(x, kernel, strides, padding,
                                 dimension_numbers=("NHWC", "HWIO", "NHWC")),
        rtol=1e-5, atol=1e-4, err_msg=name)


def test_dilated_nchw_and_float16_convolutions_go_to_lax(monkeypatch):
  monkeypatch.setattr(conv, "im2col_conv", lambda *a: pytest.fail("im2col used"))
  monkeypatch.setattr(onednn, "conv", lambda *a: pytest.fail("oneDNN used"))
  x = jnp.ones((1, 6, 6, 4))
  conv.conv_general_dilated(x, jnp.ones((3, 3, 4, 4)), (1, 1), "SAME", rhs_dilation=(2, 2),
                            dimension_numbers=("NHWC", "HWIO", "NHWC"))
  conv.conv_general_dilated(jnp.ones((1, 4, 6, 6)), jnp.ones((4, 4, 3, 3)), (1, 1), "SAME")
  conv.conv_general_dilated(x.astype(jnp.float16), jnp.ones((1, 1, 4, 4), jnp.float16),
                            (2, 2), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))


@pytest.mark.parametrize("feature_groups", [4, 2])
def test_grouped_convolutions_run_on_onednn_where_it_runs_else_on_lax(feature_groups, lowerings,
                                                                     monkeypatch):
  """Never im2col (it has no groups); lax's result either way."""
  monkeypatch.setattr(conv, "im2col_conv", lambda *a: pytest.fail("im2col used"))
  x = jax.random.normal(jax.random.key(0), (2, 6, 6, 4))
  kernel = jax.random.normal(jax.random.key(1), (1, 1, 4 // feature_groups, 8))  # 1x1/2: im2col's
  args = (x, kernel, (2, 2), "SAME")
  kwargs = {"dimension_numbers": ("NHWC", "HWIO", "NHWC"), "feature_group_count": feature_groups}
  jaxpr = str(jax.make_jaxpr(lambda: conv.conv_general_dilated(*args, **kwargs))())
  assert ("cnnjax_onednn_conv" in jaxpr) == (lowerings == "onednn")
  np.testing.assert_allclose(jax.jit(lambda: conv.conv_general_dilated(*args, **kwargs))(),
                             lax.conv_general_dilated(*args, **kwargs), rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError):  # lax's own check of the groups
    conv.conv_general_dilated(x, kernel, (2, 2), "SAME", feature_group_count=3,
                              dimension_numbers=kwargs["dimension_numbers"])
  with pytest.raises(ValueError):  # output channels not divisible by the groups: lax's check too
    conv.conv_general_dilated(x, kernel[..., :7], (2, 2), "SAME", **kwargs)


def test_bfloat16_convolutions_run_on_onednn_only_where_the_cpu_has_bf16(monkeypatch):
  shapes = ((2, 8, 8, 4), (3, 3, 4, 8), (1, 1), ((1, 1), (1, 1)))
  monkeypatch.setattr(runtime, "_onednn", True)
  monkeypatch.setattr(runtime, "_onednn_bf16", False)
  assert conv.lowering(*shapes) == "onednn"
  assert conv.lowering(*shapes, dtype="bfloat16") == "xla"
  assert not runtime.onednn_in_use("float16")  # no kernels in other dtypes
  monkeypatch.setattr(runtime, "_onednn_bf16", True)
  assert conv.lowering(*shapes, dtype="bfloat16") == "onednn"


@pytest.mark.slow
def test_conv_module_is_nn_conv_with_the_same_parameters_and_outputs(lowerings):
  x = jax.random.normal(jax.random.key(1), (2, 8, 8, 3))
  ours, plain = conv.Conv(5, (3, 3), strides=2), nn.Conv(5, (3, 3), strides=2)
  assert isinstance(ours, nn.Conv)
  variables = plain.init(jax.random.key(2), x)
  assert jax.tree.structure(ours.init(jax.random.key(2), x)) == jax.tree.structure(variables)
  np.testing.assert_allclose(ours.apply(variables, x), plain.apply(variables, x),
                             rtol=1e-5, atol=1e-5)
