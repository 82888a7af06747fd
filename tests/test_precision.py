"""Mixed precision (config.precision='bfloat16'): bf16 compute with float32 parameters,
optimizer state, batch-norm statistics and loss; the same step as float32 within bf16's
rounding, on XLA's kernels and on oneDNN's."""
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import lax

from cnnjax import config as config_lib
from cnnjax import onednn, runtime, steps
from cnnjax.errors import UserError
from cnnjax.models import batch_norm, blocks, conv
from tests.conftest import make_images, tiny_config

IDENTITY = steps.make_normalize(np.zeros(3), np.full(3, 255.0))
native_bf16 = pytest.mark.skipif(not (onednn.available() and runtime.cpu_has_bf16()),
                                 reason="no oneDNN extension or no bf16 instructions here")


def test_bf16_instructions_are_read_from_the_cpu_flags():
  assert runtime.cpu_has_bf16("processor : 0\nflags : fpu sse avx512f avx512_bf16 avx512_vnni\n")
  assert runtime.cpu_has_bf16("flags\t\t: fpu amx_bf16 amx_tile\n")
  assert not runtime.cpu_has_bf16("flags : fpu sse avx2 avx512f\n")
  assert not runtime.cpu_has_bf16("")


def test_bf16_falls_back_to_float32_on_a_cpu_without_it(monkeypatch):
  monkeypatch.setattr(runtime, "cpu_has_bf16", lambda cpuinfo=None: False)
  dtype, note = runtime.compute_dtype("bfloat16")
  assert dtype == "float32" and "no bf16 instructions" in note
  monkeypatch.setattr(runtime, "cpu_has_bf16", lambda cpuinfo=None: True)
  assert runtime.compute_dtype("bfloat16")[0] == "bfloat16"
  assert runtime.compute_dtype("float32") == ("float32", "Precision: float32")
  assert runtime.compute_dtype("auto")[0] == "float32"  # the default: float32 on CPU
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  assert runtime.compute_dtype("auto")[0] == "bfloat16"  # XLA's bf16 kernels there


def test_an_unknown_precision_is_one_line_naming_it(npz_path):
  c = tiny_config(npz_path, precision="float16")
  with pytest.raises(UserError, match=r"config.precision='float16'; expected one of \['auto', 'float32', 'bfloat16'\]"):
    config_lib.check(c)


class _ConvNet(nn.Module):
  """Two conv + batch-norm blocks and a dense head on cnnjax's Conv and BatchNorm (oneDNN's
  kernels where they are in use), without dropout."""

  @nn.compact
  def __call__(self, x, train=False):
    for width in (16, 32):
      x = conv.Conv(width, (3, 3), padding=((1, 1), (1, 1)))(x)
      x = batch_norm.BatchNorm(use_running_average=not train, momentum=0.9)(nn.relu(x))
      x = blocks.pool(x, "max", 2)
    return nn.Dense(10)(x.reshape(x.shape[0], -1))


def _step_results(dtype: str, onednn_kernels: bool, round_inputs: bool = False):
  """Loss sum, the gradient (SGD at rate 1: old - new params, one vector) and the new state
  of one train step on a fixed batch, computing in ``dtype`` (float32 inputs rounded to
  bfloat16 first if ``round_inputs``)."""
  chosen = runtime.onednn_in_use()
  runtime.configure(onednn=onednn_kernels)
  try:
    state = steps.create_train_state(_ConvNet(), optax.sgd(1.0), (32, 32, 3), seed=0)
    x, y = make_images(64, seed=3)
    normalize = ((lambda im: IDENTITY(im).astype(jnp.bfloat16).astype(jnp.float32))
                 if round_inputs else IDENTITY)
    step = jax.jit(steps.make_train_step(normalize, dtype=dtype))
    new, sums = step(state, {"image": jnp.asarray(x), "label": jnp.asarray(y)})
    grads = np.concatenate([np.ravel(a - b) for a, b in zip(jax.tree.leaves(state.params),
                                                           jax.tree.leaves(new.params))])
    return float(sums["loss"]), grads, new
  finally:
    runtime.configure(onednn=chosen)


@pytest.mark.parametrize("onednn_kernels", [
    False, pytest.param(True, marks=native_bf16)], ids=["xla", "onednn"])
def test_a_bf16_step_matches_the_float32_step_within_bf16_rounding(onednn_kernels):
  loss32, grads32, new32 = _step_results("float32", onednn_kernels)
  loss16, grads16, new16 = _step_results("bfloat16", onednn_kernels)
  assert abs(loss16 - loss32) < 0.01 * abs(loss32)
  # Parameters and statistics stay float32.
  assert all(a.dtype == jnp.float32 for a in jax.tree.leaves((new16.params, new16.batch_stats)))
  # Batch norm in training mode makes the gradient sensitive: rounding only the float32
  # step's inputs to bf16 moves it by ~2% already. The bf16 step rounds every activation
  # and cotangent of the chain (conv, ReLU, norm, pool: 5-6% here), within 4x that, and
  # points the same way.
  _, rounded, _ = _step_results("float32", onednn_kernels, round_inputs=True)
  sensitivity = np.linalg.norm(rounded - grads32)
  assert 0 < np.linalg.norm(grads16 - grads32) < 4 * sensitivity
  assert grads16 @ grads32 > 0.99 * np.linalg.norm(grads16) * np.linalg.norm(grads32)
  for s32, s16 in zip(jax.tree.leaves(new32.batch_stats), jax.tree.leaves(new16.batch_stats)):
    np.testing.assert_allclose(s16, s32, rtol=0.02, atol=0.01)


@native_bf16
def test_onednn_bf16_convolution_and_batch_norm_match_float32():
  k = jax.random.split(jax.random.PRNGKey(0), 2)
  x = jax.random.normal(k[0], (4, 12, 12, 16)).astype(jnp.bfloat16)
  w = (jax.random.normal(k[1], (3, 3, 16, 24)) * 0.1).astype(jnp.bfloat16)
  pad = ((1, 1), (1, 1))

  def reference(x, w):
    return lax.conv_general_dilated(x.astype(jnp.float32), w.astype(jnp.float32), (1, 1), pad,
                                    dimension_numbers=("NHWC", "HWIO", "NHWC"))
  y = onednn.conv(x, w, (1, 1), pad)
  assert y.dtype == jnp.bfloat16
  expected = reference(x, w)
  assert float(jnp.abs(y.astype(jnp.float32) - expected).max()) < 0.01 * float(jnp.abs(expected).max())

  def loss(fn):
    return lambda x, w: (fn(x, w).astype(jnp.float32) ** 2).sum()
  gx, gw = jax.grad(loss(lambda x, w: onednn.conv(x, w, (1, 1), pad)), (0, 1))(x, w)
  rx, rw = jax.grad(loss(reference), (0, 1))(x, w)
  assert gx.dtype == gw.dtype == jnp.bfloat16
  for got, want in ((gx, rx), (gw, rw)):
    assert float(jnp.abs(got.astype(jnp.float32) - want).max()) < 0.02 * float(jnp.abs(want).max())

  scale, shift = jnp.linspace(0.5, 1.5, 24), jnp.linspace(-1, 1, 24)
  out, mean, var = onednn.batch_norm(y, scale, shift, 1e-5)
  assert out.dtype == jnp.bfloat16 and mean.dtype == var.dtype == jnp.float32
  y32 = y.astype(jnp.float32)
  assert np.allclose(mean, y32.mean((0, 1, 2)), atol=1e-4)
  assert np.allclose(var, y32.var((0, 1, 2)), rtol=1e-3)
  ref = (y32 - y32.mean((0, 1, 2))) / jnp.sqrt(y32.var((0, 1, 2)) + 1e-5) * scale + shift
  assert float(jnp.abs(out.astype(jnp.float32) - ref).max()) < 0.05


def test_a_bf16_run_trains_and_reports_its_precision(npz_path, tmp_path, monkeypatch, capsys):
  from cnnjax import train
  monkeypatch.setattr(runtime, "cpu_has_bf16", lambda cpuinfo=None: True)
  workdir = tmp_path / "run"
  train.train_and_evaluate(tiny_config(npz_path, precision="bfloat16", num_epochs=3), workdir)
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert rows[-1]["train_loss"] < rows[0]["train_loss"] - 0.2
  assert "Precision: bfloat16 compute" in capsys.readouterr().out
