"""cnnjax.onednn and the BatchNorm that uses it: lax's and flax's values and gradients."""
import importlib.metadata

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from cnnjax import onednn, runtime
from cnnjax.errors import UserError
from cnnjax.models import batch_norm, blocks, conv, dense
from cnnjax.models.batch_norm import BatchNorm


def _installed() -> bool:
  try:
    importlib.metadata.version("onednn-cpu-gomp")
    return True
  except importlib.metadata.PackageNotFoundError:
    return False


needs_onednn = pytest.mark.skipif(not (_installed() and onednn.available()),
                                  reason="the onednn extra is not installed")


def test_the_extension_builds_and_loads_where_the_onednn_extra_is_installed():
  if not _installed():
    pytest.skip("the onednn extra is not installed")
  assert onednn.available(), onednn.unavailable_reason()
  assert onednn.unavailable_reason() == ""


def test_turned_off_by_the_environment(monkeypatch):
  monkeypatch.setenv("CNNJAX_ONEDNN", "0")
  onednn._load.cache_clear()
  try:
    assert not onednn.available()
    assert "CNNJAX_ONEDNN=0" in onednn.unavailable_reason()
    with pytest.raises(RuntimeError, match="unavailable: turned off"):
      onednn.conv(jnp.ones((1, 4, 4, 2)), jnp.ones((3, 3, 2, 2)), (1, 1), ((1, 1), (1, 1)))
  finally:
    monkeypatch.undo()
    onednn._load.cache_clear()


@pytest.mark.skipif(not _installed(), reason="the onednn extra is not installed")
def test_a_failed_build_says_why_and_leaves_xla_s_kernels(monkeypatch, tmp_path):
  monkeypatch.setenv("CNNJAX_CACHE", str(tmp_path))  # nothing built there yet
  monkeypatch.setenv("CXX", "no-such-compiler")
  onednn._load.cache_clear()
  try:
    assert not onednn.available()
    assert onednn.unavailable_reason() == (
        "RuntimeError: no C++ compiler 'no-such-compiler' on PATH (set CXX)")
    assert not runtime.configure()
    assert conv.lowering((2, 2, 2, 8), (3, 3, 8, 8), (1, 1), ((1, 1), (1, 1))) == "im2col"
  finally:
    monkeypatch.undo()
    onednn._load.cache_clear()
    runtime.configure()


@pytest.mark.skipif(not _installed(), reason="the onednn extra is not installed")
def test_each_compiler_and_set_of_flags_gets_its_own_build(monkeypatch):
  library = onednn._installed_file("onednn-cpu-gomp", "libdnnl.so.3")
  here = onednn._target("g++", library)
  assert onednn._target("g++", library) == here
  assert onednn._target("clang++", library) != here
  monkeypatch.setattr(onednn, "_FLAGS", (*onednn._FLAGS, "-O3"))
  assert onednn._target("g++", library) != here


# (x shape, kernel shape, strides, padding pairs): first layers, strided, unequal and no padding.
CONV_CASES = {
    "RGB 3x3 same": ((2, 12, 10, 3), (3, 3, 3, 8), (1, 1), ((1, 1), (1, 1))),
    "5x5 valid": ((2, 14, 14, 6), (5, 5, 6, 16), (1, 1), ((0, 0), (0, 0))),
    "3x3/2, pads (0, 1)": ((3, 8, 8, 32), (3, 3, 32, 8), (2, 2), ((0, 1), (0, 1))),
    "3x3/2 on odd size": ((2, 7, 7, 5), (3, 3, 5, 7), (2, 2), ((1, 1), (1, 1))),
    "1x1/2": ((2, 9, 9, 16), (1, 1, 16, 8), (2, 2), ((0, 0), (0, 0))),
    "1x1 map": ((4, 1, 1, 16), (3, 3, 16, 8), (1, 1), ((1, 1), (1, 1))),
    "depthwise 3x3/2, pads (0, 1)": ((2, 9, 9, 8), (3, 3, 1, 8), (2, 2), ((0, 1), (0, 1))),
    "depthwise 5x5 same": ((2, 8, 8, 6), (5, 5, 1, 6), (1, 1), ((2, 2), (2, 2))),
    "2 groups 3x3": ((2, 6, 6, 8), (3, 3, 4, 6), (1, 1), ((1, 1), (1, 1))),
}


def _lax_conv(x, kernel, strides, padding):
  """lax's NHWC/HWIO convolution, grouped as the shapes say (the reference)."""
  return lax.conv_general_dilated(x, kernel, strides, padding,
                                  dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                  feature_group_count=x.shape[-1] // kernel.shape[2])


@pytest.mark.slow
@needs_onednn
@pytest.mark.parametrize("name", CONV_CASES)
def test_conv_values_and_gradients_equal_lax(name):
  x_shape, k_shape, strides, padding = CONV_CASES[name]
  kx, kk, kr = jax.random.split(jax.random.key(0), 3)
  x, kernel = jax.random.normal(kx, x_shape), jax.random.normal(kk, k_shape)

  def loss(fn, x, kernel):
    y = fn(x, kernel)
    return jnp.sum(y * jax.random.normal(kr, y.shape)), y

  def reference(x, kernel):
    return _lax_conv(x, kernel, strides, padding)

  def ours(x, kernel):
    return onednn.conv(x, kernel, strides, padding)

  results = [jax.jit(jax.value_and_grad(lambda *a, fn=fn: loss(fn, *a), (0, 1), has_aux=True))(
      x, kernel) for fn in (reference, ours)]
  (_, y_want), g_want = results[0]
  (_, y_got), g_got = results[1]
  np.testing.assert_allclose(y_got, y_want, rtol=1e-5, atol=1e-4)
  for got, want in zip(g_got, g_want):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)


@needs_onednn
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_weight_gradient_as_one_matrix_product_equals_the_convolution_s(dtype, monkeypatch):
  """CNNJAX_ONEDNN_WEIGHTS_MATMUL=1 forces the patches^T dy product that AMX machines use on
  small maps; =0 oneDNN's backward-weights convolution. Both against lax, with and without
  the bias gradient, on every case (strided, unequally padded, 1x1 map; grouped ones always
  take the convolution)."""
  for name, (x_shape, k_shape, strides, padding) in CONV_CASES.items():
    kx, kk, kd = jax.random.split(jax.random.key(2), 3)
    x = jax.random.normal(kx, x_shape).astype(dtype)
    kernel = jax.random.normal(kk, k_shape).astype(dtype)
    dy = jax.random.normal(kd, onednn.conv(x, kernel, strides, padding).shape).astype(dtype)
    _, vjp = jax.vjp(lambda k: _lax_conv(x.astype(jnp.float32), k, strides, padding),
                     kernel.astype(jnp.float32))
    want, want_bias = vjp(dy.astype(jnp.float32))[0], dy.astype(jnp.float32).sum((0, 1, 2))
    results = {}
    for mode in ("1", "0"):
      monkeypatch.setenv("CNNJAX_ONEDNN_WEIGHTS_MATMUL", mode)
      dw = onednn._conv_call("bwd_weights", k_shape, x, dy, strides, padding)
      dw_b, dbias = onednn._call(
          "conv_bwd_weights_bias", [(k_shape, x.dtype), ((k_shape[3],), jnp.float32)], x, dy,
          **onednn._attributes(strides, padding))
      assert dw.dtype == dw_b.dtype == dtype and dbias.dtype == jnp.float32
      results[mode] = np.asarray(dw.astype(jnp.float32))
      # float32 accumulation in both, rounded once to dw's dtype
      tolerance = ({"rtol": 1e-5, "atol": 1e-4} if dtype == "float32"
                   else {"rtol": 1e-2, "atol": 0.1})
      for got in (dw, dw_b):
        np.testing.assert_allclose(got.astype(jnp.float32), want, **tolerance, err_msg=name)
      np.testing.assert_allclose(dbias, want_bias, rtol=1e-5, atol=1e-4, err_msg=name)
    np.testing.assert_allclose(results["1"], results["0"], atol=1e-4, err_msg=name,
                               rtol=1e-2 if dtype == "bfloat16" else 1e-5)


@needs_onednn
@pytest.mark.parametrize("activation", [None, "relu", "relu6"])
@pytest.mark.parametrize("name", ["RGB 3x3 same", "3x3/2, pads (0, 1)", "1x1/2",
                                  "depthwise 3x3/2, pads (0, 1)"])
def test_conv_with_bias_values_and_gradients_equal_lax(name, activation):
  x_shape, k_shape, strides, padding = CONV_CASES[name]
  kx, kk, kb, kr = jax.random.split(jax.random.key(1), 4)
  x, kernel = jax.random.normal(kx, x_shape), jax.random.normal(kk, k_shape)
  bias = jax.random.normal(kb, k_shape[-1:])

  def loss(fn, *args):
    y = fn(*args)
    return jnp.sum(y * jax.random.normal(kr, y.shape)), y

  def reference(x, kernel, bias):
    y = lax.conv_general_dilated(x, kernel, strides, padding,
                                 dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                 feature_group_count=x.shape[-1] // kernel.shape[2]) + bias
    return {None: y, "relu": nn.relu(y), "relu6": nn.relu6(y)}[activation]

  def ours(x, kernel, bias):
    return onednn.conv_bias(x, kernel, bias, strides, padding, activation)

  (_, y_want), g_want, (_, y_got), g_got = (
      r for fn in (reference, ours)
      for r in jax.value_and_grad(lambda *a, fn=fn: loss(fn, *a), (0, 1, 2), has_aux=True)(
          x, kernel, bias))
  np.testing.assert_allclose(y_got, y_want, rtol=1e-5, atol=1e-4)
  assert (y_got.min() == 0) == (activation is not None)
  assert (y_got.max() == 6) == (activation == "relu6")
  for got, want in zip(g_got, g_want):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)


@needs_onednn
def test_the_fused_relu_in_bfloat16_is_relu_after_the_rounded_convolution():
  kx, kk, kb, kr = jax.random.split(jax.random.key(4), 4)
  x = jax.random.normal(kx, (4, 8, 8, 16), jnp.bfloat16)
  kernel = jax.random.normal(kk, (3, 3, 16, 8), jnp.bfloat16)
  bias = jax.random.normal(kb, (8,))
  r = jax.random.normal(kr, (4, 8, 8, 8), jnp.bfloat16)

  def value_and_grads(fn):
    return jax.value_and_grad(lambda *a: (fn(*a) * r).astype(jnp.float32).sum(), (0, 1, 2))(
        x, kernel, bias)

  pad = ((1, 1), (1, 1))
  fused = value_and_grads(lambda *a: onednn.conv_bias(*a, (1, 1), pad, "relu"))
  after = value_and_grads(lambda *a: nn.relu(onednn.conv_bias(*a, (1, 1), pad)))
  for got, want in zip(jax.tree.leaves(fused), jax.tree.leaves(after)):
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))


def test_a_nan_before_the_fused_relu_comes_out_as_zero_as_documented():
  if not (_installed() and onednn.available()):
    pytest.skip("the onednn extra is not installed")
  x = jnp.full((1, 3, 3, 1), jnp.nan)
  y = onednn.conv_bias(x, jnp.ones((1, 1, 1, 2)), jnp.zeros(2), (1, 1), ((0, 0), (0, 0)),
                       "relu")
  np.testing.assert_array_equal(y, 0.0)  # oneDNN's max(x, 0); nn.relu (XLA) keeps the NaN


@needs_onednn
def test_the_conv_module_adds_its_bias_inside_onednn_as_nn_conv_would(monkeypatch):
  monkeypatch.setattr(runtime, "_onednn", True)
  x = jax.random.normal(jax.random.key(2), (2, 9, 9, 4))
  for options in ({"padding": "SAME", "strides": 2}, {"padding": ((1, 0), (2, 1))},
                  {"use_bias": False}, {"padding": "SAME", "relu": True},
                  {"use_bias": False, "relu": True}):
    relu = options.pop("relu", False)
    ours, plain = conv.Conv(6, (3, 3), relu=relu, **options), nn.Conv(6, (3, 3), **options)
    variables = plain.init(jax.random.key(3), x)
    assert jax.tree.structure(ours.init(jax.random.key(3), x)) == jax.tree.structure(variables)
    jaxpr = str(jax.make_jaxpr(ours.apply)(variables, x))
    assert ("conv_fwd_bias" in jaxpr) == options.get("use_bias", True)
    assert ("conv_fwd_bias_relu" in jaxpr) == (relu and options.get("use_bias", True))
    want_fn = (lambda v, x: nn.relu(plain.apply(v, x))) if relu else plain.apply
    grad = lambda f: jax.grad(lambda v: (f(v, x) ** 2).sum())(variables)  # noqa: E731
    np.testing.assert_allclose(ours.apply(variables, x), want_fn(variables, x),
                               rtol=1e-5, atol=1e-4)
    for got, want in zip(jax.tree.leaves(grad(ours.apply)), jax.tree.leaves(grad(want_fn))):
      np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-3)


@needs_onednn
@pytest.mark.parametrize("dtype, tolerance", [("float32", 1e-5), ("bfloat16", 2 ** -7)])
def test_matmul_values_and_gradients_equal_xla_s(dtype, tolerance):
  """The product and both gradients (the transposed forms: dy w^T, x^T dy)."""
  k = jax.random.split(jax.random.key(4), 3)
  x = jax.random.normal(k[0], (37, 48), dtype)
  w = jax.random.normal(k[1], (48, 20), dtype)
  r = jax.random.normal(k[2], (37, 20))

  def value_and_grads(product):
    return jax.jit(jax.value_and_grad(lambda x, w: (product(x, w).astype(jnp.float32) * r).sum(),
                                      argnums=(0, 1)))(x, w)

  (got, got_grads), (want, want_grads) = value_and_grads(onednn.matmul), value_and_grads(jnp.matmul)
  assert onednn.matmul(x, w).dtype == x.dtype and got_grads[1].dtype == w.dtype
  for a, b in [(onednn.matmul(x, w), x @ w), *zip(got_grads, want_grads)]:
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    np.testing.assert_allclose(a, b, atol=tolerance * np.abs(b).max())  # bf16: a rounding apart
  terms = np.abs(np.asarray(x, np.float32) @ np.asarray(w, np.float32) * np.asarray(r)).sum()
  np.testing.assert_allclose(got, want, atol=tolerance * terms)  # each term a rounding apart
  with pytest.raises(ValueError, match="expected \\[M, K\\] and \\[K, N\\] matrices"):
    onednn.matmul(x, w.T)


def _dense_case():
  x = jax.random.normal(jax.random.key(5), (2, 3, 16))  # [..., K]: a leading axis more
  variables = nn.Dense(8).init(jax.random.key(6), x)
  return x, variables, jax.tree.map(lambda v: v.astype(jnp.bfloat16), variables)


def test_the_dense_module_has_nn_dense_s_parameters_and_routes_only_bfloat16_to_onednn(
    monkeypatch):
  monkeypatch.setattr(runtime, "_onednn", True)
  monkeypatch.setattr(runtime, "_onednn_bf16", True)
  calls = []
  monkeypatch.setattr(onednn, "matmul", lambda a, b: calls.append(a.shape) or a @ b)
  x, variables, bf16 = _dense_case()
  ours = dense.Dense(8)
  assert jax.tree.structure(ours.init(jax.random.key(6), x)) == jax.tree.structure(variables)
  ours.apply(bf16, x.astype(jnp.bfloat16))  # 6 x 16 x 8 multiply-adds: XLA's, as too small
  assert calls == []
  monkeypatch.setattr(dense, "ONEDNN_MIN_MACS", 6 * 16 * 8)
  ours.apply(variables, x)  # float32: XLA's product
  assert calls == []
  assert ours.apply(bf16, x.astype(jnp.bfloat16)).shape == (2, 3, 8)
  assert calls == [(6, 16)]  # the leading axes flattened into rows
  monkeypatch.setattr(runtime, "_onednn_bf16", False)  # a CPU without bf16 instructions
  ours.apply(bf16, x.astype(jnp.bfloat16))
  assert calls == [(6, 16)]


@needs_onednn
def test_the_dense_module_s_bfloat16_result_is_nn_dense_s(monkeypatch):
  monkeypatch.setattr(runtime, "_onednn_bf16", True)
  monkeypatch.setattr(dense, "ONEDNN_MIN_MACS", 0)
  x, _, bf16 = _dense_case()
  xb = x.astype(jnp.bfloat16)
  got, want = dense.Dense(8).apply(bf16, xb), nn.Dense(8).apply(bf16, xb)
  assert got.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                             atol=2 ** -7 * float(np.abs(np.asarray(want, np.float32)).max()))


def _reference_norm(x, scale, shift, epsilon):
  axes = tuple(range(x.ndim - 1))
  mean, var = x.mean(axes), x.var(axes)
  return (x - mean) / jnp.sqrt(var + epsilon) * scale + shift, mean, var


@pytest.mark.slow
@needs_onednn
@pytest.mark.parametrize("shape", [(4, 5, 6, 8), (16, 7)])
@pytest.mark.parametrize("differentiate_statistics", [False, True])
def test_batch_norm_values_and_gradients_equal_the_formula(shape, differentiate_statistics):
  k = jax.random.split(jax.random.key(1), 4)
  x = jax.random.normal(k[0], shape) * 3 + 1
  scale, shift = jax.random.normal(k[1], shape[-1:]), jax.random.normal(k[2], shape[-1:])
  r = jax.random.normal(k[3], shape)
  weights = jnp.arange(shape[-1], dtype=jnp.float32) * float(differentiate_statistics)

  def loss(fn, x, scale, shift):
    y, mean, var = fn(x, scale, shift, 1e-5)
    return jnp.sum(y * r) + jnp.sum(mean * weights) + jnp.sum(var * weights ** 2), (y, mean, var)

  want, g_want = jax.value_and_grad(lambda *a: loss(_reference_norm, *a), (0, 1, 2),
                                    has_aux=True)(x, scale, shift)
  got, g_got = jax.jit(jax.value_and_grad(lambda *a: loss(onednn.batch_norm, *a), (0, 1, 2),
                                          has_aux=True))(x, scale, shift)
  for a, b in zip(got[1], want[1]):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  for a, b in zip(g_got, g_want):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
@needs_onednn
@pytest.mark.parametrize("options", [{}, {"use_scale": False, "epsilon": 1e-12, "momentum": 0.4},
                                     {"activation": "relu6"}])
@pytest.mark.parametrize("shape", [(8, 4, 4, 6), (32, 5)])
def test_batch_norm_module_trains_as_flax_does(options, shape, monkeypatch):
  x = jax.random.normal(jax.random.key(0), shape) * 2 + 1
  ours, options = BatchNorm(**options), dict(options)  # pytest shares the dict between cases
  then = batch_norm.ACTIVATIONS[options.pop("activation", None)]  # after flax's
  plain = nn.BatchNorm(**options)
  variables = plain.init(jax.random.key(1), x, use_running_average=False)
  assert jax.tree.structure(ours.init(jax.random.key(1), x, use_running_average=False)) \
      == jax.tree.structure(variables)
  used = []
  monkeypatch.setattr(onednn, "batch_norm", lambda *a, f=onednn.batch_norm: used.append(1) or f(*a))

  def loss(module, params, then=lambda y: y):
    y, updates = module.apply({**variables, "params": params}, x, use_running_average=False,
                              mutable=["batch_stats"])
    return jnp.sum(jnp.sin(then(y))), (then(y), updates)

  (_, (y_want, u_want)), g_want = jax.value_and_grad(
      lambda p: loss(plain, p, then), has_aux=True)(variables["params"])
  (_, (y_got, u_got)), g_got = jax.value_and_grad(
      lambda p: loss(ours, p), has_aux=True)(variables["params"])
  assert used, "BatchNorm did not run on oneDNN"
  np.testing.assert_allclose(y_got, y_want, rtol=1e-5, atol=1e-5)
  for a, b in zip(jax.tree.leaves((u_got, g_got)), jax.tree.leaves((u_want, g_want))):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
  # Evaluation uses the running averages through flax's own code: the same result.
  np.testing.assert_allclose(ours.apply(variables, x, use_running_average=True),
                             then(plain.apply(variables, x, use_running_average=True)), rtol=1e-6)


def test_batch_norm_module_refuses_an_unknown_activation():
  with pytest.raises(UserError, match="BatchNorm activation 'gelu'; expected one of"):
    BatchNorm(activation="gelu").init(jax.random.key(0), jnp.ones((2, 3)),
                                      use_running_average=True)


@pytest.mark.slow
def test_batch_norm_module_leaves_other_dtypes_and_axes_to_flax(monkeypatch):
  for name in ("batch_norm", "batch_norm_inference"):
    monkeypatch.setattr(onednn, name, lambda *a: pytest.fail("oneDNN used"))
  x = jnp.ones((4, 3, 5))
  for module, inputs in ((BatchNorm(axis=1), x), (BatchNorm(), x.astype(jnp.float16)),
                         (BatchNorm(dtype=jnp.bfloat16), x)):
    variables = module.init(jax.random.key(0), inputs, use_running_average=False)
    module.apply(variables, inputs, use_running_average=False, mutable=["batch_stats"])
  module = BatchNorm()  # float32 inference: XLA's fusion (faster there)
  module.apply(module.init(jax.random.key(0), x, use_running_average=True), x,
               use_running_average=True)


def test_bfloat16_with_another_axis_dtype_a_mask_relu6_or_24_channels_stays_flax_s(monkeypatch):
  if not runtime.onednn_in_use("bfloat16"):
    pytest.skip("oneDNN's bfloat16 kernels do not run here")
  monkeypatch.setattr(onednn, "batch_norm_inference", lambda *a: pytest.fail("oneDNN used"))
  x = jnp.ones((4, 16, 16), jnp.bfloat16)  # 16 channels on either axis: oneDNN could run
  for module, mask in ((BatchNorm(axis=1), None), (BatchNorm(dtype=jnp.bfloat16), None),
                       (BatchNorm(), x > 0), (BatchNorm(activation="relu6"), None)):
    module.apply(module.init(jax.random.key(0), x, use_running_average=True), x,
                 use_running_average=True, mask=mask)
  monkeypatch.setattr(onednn, "batch_norm", lambda *a: pytest.fail("oneDNN used"))
  x = jnp.ones((4, 3, 24), jnp.bfloat16)  # oneDNN's bf16 kernels want multiples of 16 channels
  for train in (False, True):
    module = BatchNorm(use_running_average=not train)
    module.apply(module.init(jax.random.key(0), x), x, mutable=["batch_stats"])


def _inference_arguments(dtype):
  k = jax.random.split(jax.random.key(2), 6)
  shape = (4, 5, 6, 16)  # bfloat16 on oneDNN: a multiple of 16 channels
  x = (jax.random.normal(k[0], shape) * 3 + 1).astype(dtype)
  mean = jax.random.normal(k[1], (16,))
  var = jax.random.uniform(k[2], (16,), minval=0.5, maxval=2)
  scale, shift = jax.random.normal(k[3], (16,)) * 4, jax.random.normal(k[4], (16,))
  return (x, mean, var, scale, shift), jax.random.normal(k[5], shape)


def _reference_inference(x, mean, var, scale, shift, epsilon, relu=False):
  y = (x.astype(jnp.float32) - mean) / jnp.sqrt(var + epsilon) * scale + shift
  return (nn.relu(y) if relu else y).astype(x.dtype)


@needs_onednn
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_batch_norm_inference_values_and_gradients_equal_the_formula(dtype, relu):
  args, r = _inference_arguments(dtype)

  def value_and_grads(fn):
    return jax.jit(jax.value_and_grad(
        lambda *a: jnp.sum(fn(*a, 1e-5, relu).astype(jnp.float32) * r),
        tuple(range(5))))(*args)

  y = jax.jit(onednn.batch_norm_inference, static_argnums=(5, 6))(*args, 1e-5, relu)
  want = _reference_inference(*args, 1e-5, relu)
  assert y.dtype == want.dtype == jnp.dtype(dtype)
  if relu:  # both sides of the clipping are exercised
    assert (want == 0).any() and (want > 0).any()
  tolerance = {"float32": 1e-5, "bfloat16": 2 ** -7}[dtype]  # bf16: one rounding apart at most
  np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(want, np.float32),
                             rtol=tolerance, atol=tolerance)
  (_, got), (_, expected) = value_and_grads(onednn.batch_norm_inference), value_and_grads(
      _reference_inference)
  tolerance = {"float32": 1e-4, "bfloat16": 2 ** -7}[dtype]  # dx: bf16, grouped differently
  for a, b in zip(got, expected):
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                               rtol=tolerance, atol=tolerance)


@needs_onednn
def test_batch_norm_refuses_per_channel_operands_of_another_length():
  (x, mean, var, scale, shift), _ = _inference_arguments("float32")
  with pytest.raises(ValueError, match=r"expected \(16,\) each"):
    onednn.batch_norm_inference(x, mean[:5], var, scale, shift, 1e-5)
  with pytest.raises(ValueError, match=r"expected \(16,\) each"):
    onednn.batch_norm(x, scale, jnp.zeros(9), 1e-5)
  empty = jnp.zeros((4, 0))  # no channel (the kernels would divide by it) or no row
  with pytest.raises(ValueError, match=r"x \(4, 0\); expected at least one channel and one row"):
    onednn.batch_norm(empty, jnp.zeros(0), jnp.zeros(0), 1e-5)
  with pytest.raises(ValueError, match=r"x \(0, 16\); expected at least one channel"):
    onednn.batch_norm_inference(x[0, 0, :0], mean, var, scale, shift, 1e-5)
  with pytest.raises(jax.errors.JaxRuntimeError, match="must hold whole rows of its channels"):
    onednn._call("norm_fwd", [((0, 16), jnp.float32), ((16,), jnp.float32),  # the FFI's own check
                              ((16,), jnp.float32)], x[0, 0, :0], scale, shift,
                 epsilon=np.float32(1e-5))


@needs_onednn
@pytest.mark.parametrize("shape", [(4, 0), (0, 16)])
def test_the_batch_norm_module_leaves_empty_inputs_to_flax(shape, monkeypatch):
  monkeypatch.setattr(onednn, "batch_norm", lambda *a: pytest.fail("oneDNN used"))
  x = jnp.zeros(shape)
  module = BatchNorm(use_running_average=False)
  y, _ = module.apply(module.init(jax.random.key(0), x), x, mutable=["batch_stats"])
  assert y.shape == shape


@pytest.mark.parametrize("options", [{}, {"use_scale": False, "use_bias": False},
                                     {"activation": "relu"}])
def test_batch_norm_module_evaluates_bfloat16_on_onednn_as_flax_does(options, monkeypatch):
  if not runtime.onednn_in_use("bfloat16"):
    pytest.skip("oneDNN's bfloat16 kernels do not run here")
  (x, mean, var, scale, shift), r = _inference_arguments("bfloat16")
  params = {"scale": scale, "bias": shift}
  params = {k: v for k, v in params.items() if options.get(f"use_{k}", True)}
  stats = {"mean": mean, "var": var}
  used = []
  monkeypatch.setattr(onednn, "batch_norm_inference",
                      lambda *a, f=onednn.batch_norm_inference: used.append(1) or f(*a))

  def value_and_grads(module, then=lambda y: y):  # saliency-style: through the evaluated layer
    def loss(params, x):
      y = then(module.apply({"params": params, "batch_stats": stats}, x,
                            use_running_average=True))
      return jnp.sum(y.astype(jnp.float32) * r), y
    return jax.jit(jax.value_and_grad(loss, (0, 1), has_aux=True))(params, x)

  (_, got), grads = value_and_grads(BatchNorm(**options))
  assert used, "BatchNorm did not run on oneDNN"
  options = dict(options)  # pytest's, unchanged
  activation = options.pop("activation", None)
  (_, want), want_grads = value_and_grads(nn.BatchNorm(**options),  # float32 (promoted)
                                          batch_norm.ACTIVATIONS[activation])
  assert got.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=2 ** -8, atol=2 ** -8)
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):
    # The cotangent of a bfloat16 output is bfloat16: sums over the batch of rounded terms.
    b = np.asarray(b, np.float32)
    np.testing.assert_allclose(np.asarray(a, np.float32), b, atol=2 ** -6 * np.abs(b).max())


@needs_onednn
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("shape, window, loops", [
    ((3, 8, 8, 5), 2, "native"), ((2, 7, 9, 4), 2, "native"), ((2, 9, 10, 3), 3, "native"),
    ((2, 1, 5, 3), 2, "native"),  # no output rows
    # 16 channels or more: AVX-512's loops where the CPU has it (17: a remainder lane), and
    # forced to the loops of CPUs without it (under 16 channels every CPU runs those)
    ((2, 8, 8, 32), 2, "native"), ((2, 7, 9, 17), 2, "native"),
    ((2, 8, 8, 32), 2, "any_x86"), ((2, 7, 9, 17), 2, "any_x86")])
def test_max_pool_values_and_gradients_equal_the_xla_version_bit_for_bit(shape, window, dtype,
                                                                        loops, monkeypatch):
  # Rounded values tie often; NaN, infinities and signed zeros sprinkled in. The XLA version
  # (blocks.max_pool) is tested against reduce_max in test_models.py.
  if loops == "any_x86":
    monkeypatch.setenv("CNNJAX_ONEDNN_POOL_LOOPS", loops)
  rng = np.random.default_rng(0)
  x = np.round(rng.normal(size=shape) * 1.5).astype(np.float32)
  x.flat[rng.choice(x.size, 12, replace=False)] = [np.nan, np.inf, -np.inf, -0.0] * 3
  x = jnp.asarray(x, dtype)
  r = jnp.asarray(rng.normal(size=(shape[0], shape[1] // window, shape[2] // window, shape[3])),
                  dtype)

  def loss(pool):
    return jax.jit(jax.value_and_grad(lambda v: (pool(v, window) * r).astype(jnp.float32).sum()))

  def bits(a):
    return np.asarray(a).view(np.uint16 if a.dtype == jnp.bfloat16 else np.uint32)

  # Equal values (of a window's -0 and +0 the kernel keeps the first, XLA's maximum +0;
  # compared in float32, where numpy's NaN test holds for every ml_dtypes) ...
  np.testing.assert_array_equal(np.asarray(onednn.max_pool(x, window), np.float32),
                                np.asarray(blocks.max_pool(x, window), np.float32))
  (_, grad), (_, expected) = loss(onednn.max_pool)(x), loss(blocks.max_pool)(x)
  assert grad.dtype == dtype
  np.testing.assert_array_equal(bits(grad), bits(expected))  # ... and the same gradient, bits


@needs_onednn
def test_pool_runs_max_pooling_on_the_extension_for_float32_and_bfloat16_only(monkeypatch):
  monkeypatch.setattr(runtime, "_onednn", True)
  monkeypatch.setattr(runtime, "_onednn_bf16", True)  # as on a CPU with bf16 instructions
  calls = []
  monkeypatch.setattr(onednn, "max_pool", lambda x, w: calls.append(x.dtype) or blocks.max_pool(x, w))
  for dtype in (jnp.float32, jnp.bfloat16, jnp.float16):
    blocks.pool(jnp.ones((1, 4, 4, 2), dtype), "max", 2)
  assert calls == [jnp.float32, jnp.bfloat16]


@needs_onednn
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("shape, window, stride, padding, loops", [
    ((2, 9, 9, 5), 3, 2, ((1, 1), (1, 1)), "native"),  # ResNet's stem
    ((2, 8, 7, 3), 3, 2, ((0, 1), (1, 0)), "native"),  # unequal padding
    ((2, 7, 7, 3), 3, 1, ((1, 1), (1, 1)), "native"),  # every pixel in nine windows
    ((1, 6, 5, 4), 2, 2, ((0, 0), (0, 0)), "native"),  # non-overlapping, a remainder column
    ((1, 2, 2, 3), 3, 2, ((3, 3), (3, 3)), "native"),  # first windows all padding: -inf
    ((2, 9, 9, 32), 3, 2, ((1, 1), (1, 1)), "native"),  # AVX-512's loops where the CPU has it
    ((1, 7, 7, 17), 3, 1, ((1, 1), (1, 1)), "native"),
    ((2, 9, 9, 32), 3, 2, ((1, 1), (1, 1)), "any_x86"),  # the loops of CPUs without it
    ((1, 7, 7, 17), 3, 1, ((1, 1), (1, 1)), "any_x86")])
def test_window_max_pool_values_and_gradients_equal_flax_s(shape, window, stride, padding,
                                                           dtype, loops, monkeypatch):
  """``nn.max_pool``'s values, and its gradient (all to a window's first maximum) on ties:
  bit for bit in float32; in bfloat16 overlapping windows' shares are summed in float32 and
  rounded once, where XLA rounds each addition. Both copies of the loops (as above)."""
  if loops == "any_x86":
    monkeypatch.setenv("CNNJAX_ONEDNN_POOL_LOOPS", loops)
  rng = np.random.default_rng(0)
  x = np.maximum(np.round(rng.normal(size=shape) * 1.5), 0).astype(np.float32)  # many ties
  x.flat[rng.choice(x.size, 3, replace=False)] = [np.inf, -np.inf, -0.0]
  x = jnp.asarray(x, dtype)

  def flax_pool(v):
    return nn.max_pool(v, (window, window), (stride, stride), padding)

  y = flax_pool(x)
  r = jnp.asarray(rng.normal(size=y.shape), dtype)

  def value_and_grad(pool):
    return jax.jit(jax.value_and_grad(lambda v: (pool(v) * r).astype(jnp.float32).sum()))(x)

  np.testing.assert_array_equal(onednn.window_max_pool(x, window, stride, padding), y)
  (_, grad), (_, expected) = (
      value_and_grad(lambda v: onednn.window_max_pool(v, window, stride, padding)),
      value_and_grad(flax_pool))
  assert grad.dtype == dtype
  if dtype == "float32" or stride == window:
    np.testing.assert_array_equal(grad, expected)
  else:
    np.testing.assert_allclose(grad.astype(jnp.float32), expected.astype(jnp.float32),
                               rtol=2e-2, atol=2e-2)


def test_window_max_pool_runs_on_the_extension_where_it_runs(monkeypatch):
  monkeypatch.setattr(runtime, "_onednn_bf16", False)  # as on a CPU without bf16
  calls = []
  monkeypatch.setattr(onednn, "window_max_pool",
                      lambda x, *a: calls.append(x.dtype) or jnp.zeros((1, 3, 3, 2), x.dtype))
  for on in (True, False):
    monkeypatch.setattr(runtime, "_onednn", on)
    for dtype in (jnp.float32, jnp.bfloat16, jnp.float16):
      for padding in (((1, 1), (1, 1)), "SAME"):
        y = blocks.window_max_pool(jnp.ones((1, 6, 6, 2), dtype), 3, 2, padding)
        assert y.shape == (1, 3, 3, 2)
  assert calls == [jnp.float32] * 2
