import jax
import numpy as np
import optax
import pytest
from flax import traverse_util

from cnnjax import assemble, steps
from cnnjax.errors import UserError
from cnnjax.models import create_model
from tests.conftest import tiny_config


def _flat(params):
  return {"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(params).items()}


def test_torch_init_draws_kernels_and_biases_as_pytorch_layers_do():
  state = steps.create_train_state(create_model("bn_cnn"), optax.adam(1e-3), (32, 32, 3), 0)
  ours, before = _flat(steps.torch_init(state.params, 0)), _flat(state.params)
  assert ours.keys() == before.keys()
  for name, conv_fan in [("Conv_0", 3 * 3 * 3), ("Conv_1", 3 * 3 * 32), ("Dense_0", None)]:
    kernel, bias = ours[f"{name}/kernel"], ours[f"{name}/bias"]
    fan = conv_fan or kernel.shape[0]
    bound = 1 / np.sqrt(fan)
    assert np.abs(kernel).max() <= bound and np.abs(bias).max() <= bound
    # Uniform on [-b, b]: standard deviation b / sqrt(3) (flax's lecun-normal: 1 / sqrt(fan)).
    assert kernel.std() == pytest.approx(bound / np.sqrt(3), rel=0.15)
    assert np.abs(bias).max() > 0  # flax's biases start at zero
  for name in before:
    if name.split("/")[-1] not in ("kernel", "bias") or "BatchNorm" in name:
      np.testing.assert_array_equal(ours[name], before[name])  # scales, offsets untouched
  again, other = _flat(steps.torch_init(state.params, 0)), _flat(steps.torch_init(state.params, 1))
  assert all(np.array_equal(ours[k], again[k]) for k in ours)
  assert not np.array_equal(ours["Conv_0/kernel"], other["Conv_0/kernel"])


def test_config_init_torch_starts_a_run_from_pytorch_defaults(npz_path):
  run = assemble.build(tiny_config(npz_path, init="torch"))
  assert run.notes == ["Initial weights: PyTorch's layer defaults, kernels and biases "
                       "U(+-1/sqrt(fan_in)) (init='torch')"]
  flax_run = assemble.build(tiny_config(npz_path))
  assert flax_run.notes == []
  kernels = [v for k, v in _flat(run.state.params).items() if k.endswith("kernel")]
  assert all(np.abs(k).max() <= 1 / np.sqrt(np.prod(k.shape[:-1])) for k in kernels)
  np.testing.assert_array_equal(
      _flat(run.state.params)["ConvBlock_0/Conv_0/kernel"],
      _flat(steps.torch_init(flax_run.state.params, 0))["ConvBlock_0/Conv_0/kernel"])
  assert jax.tree.structure(run.state.opt_state) == jax.tree.structure(flax_run.state.opt_state)


def test_an_unknown_init_is_one_user_error():
  with pytest.raises(UserError, match=r"init='keras'; expected one of \['flax', 'torch'\]"):
    steps.create_train_state(create_model("seed_cnn"), optax.adam(1e-3), (8, 8, 3), 0, "keras")


def test_the_torch_init_is_drawn_in_the_one_compiled_init(compiles):
  model, tx = create_model("seed_cnn"), optax.adam(1e-3)
  state = steps.create_train_state(model, tx, (8, 8, 3), 3, "torch")
  assert compiles == [1]
  flax_state = steps.create_train_state(model, tx, (8, 8, 3), 3)
  expected = _flat(steps.torch_init(flax_state.params, 3))  # the same draws, compiled apart
  assert all(np.array_equal(v, expected[k]) for k, v in _flat(state.params).items())
