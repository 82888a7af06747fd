"""AirbenchNet's data-dependent pieces: the whitening stem and the dirac initialisation."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import lax

from cnnjax import assemble, steps
from cnnjax.models import create_model
from cnnjax.models.airbench import WHITEN_PATCHES, dirac_init, whitening_kernel
from experiments.configs import cifar_fast


def _conv(x, kernel):
  return lax.conv_general_dilated(x, kernel, (1, 1), "VALID",
                                  dimension_numbers=("NHWC", "HWIO", "NHWC"))


def test_whitening_kernel_decorrelates_the_patches():
  rng = np.random.default_rng(0)
  base = rng.normal(size=(64, 12, 12, 3)).astype(np.float32)
  images = base + 0.8 * np.roll(base, 1, axis=2) + 0.5 * base[..., :1]  # correlated pixels
  kernel = whitening_kernel(images, size=2, eps=0.0)
  assert kernel.shape == (2, 2, 3, 24)
  np.testing.assert_array_equal(kernel[..., 12:], -kernel[..., :12])
  out = np.asarray(_conv(jnp.asarray(images), jnp.asarray(kernel[..., :12]))).reshape(-1, 12)
  np.testing.assert_allclose(out.T @ out / len(out), np.eye(12), atol=1e-3)
  raw = np.asarray(_conv(jnp.asarray(images), jnp.eye(12).reshape(2, 2, 3, 12))).reshape(-1, 12)
  assert np.abs(raw.T @ raw / len(raw) - np.eye(12)).max() > 0.3  # the input was not white


@pytest.mark.slow
def test_dirac_init_passes_the_input_channels_through():
  kernel = dirac_init()(jax.random.PRNGKey(0), (3, 3, 4, 6))
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 5, 5, 4))
  y = lax.conv_general_dilated(x, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
  np.testing.assert_allclose(y[..., :4], x, atol=1e-6)
  assert np.abs(y[..., 4:]).max() > 0.1  # the other outputs keep the random init


@pytest.mark.slow
def test_setup_whitens_a_fresh_model_from_the_training_images(npz_path):
  config = cifar_fast.get_config()  # whiten/kernel frozen by its optimizer.groups
  config.data.source = str(npz_path)
  config.batch_size = 32
  s = assemble.build(config)
  expected = whitening_kernel(np.asarray(s.normalize(s.train[0][:WHITEN_PATCHES])))
  np.testing.assert_allclose(s.state.params["whiten"]["kernel"], expected, rtol=1e-6)
  state, _ = s.runner.train_step(s.runner.put_state(s.state),
                                 s.runner.to_global({"image": s.train[0][:32], "label": s.train[1][:32]}))
  np.testing.assert_array_equal(state.params["whiten"]["kernel"], expected)  # frozen
  fresh = steps.create_train_state(create_model("airbench"), optax.sgd(0.1), (32, 32, 3), 0)
  assert not np.allclose(fresh.params["whiten"]["kernel"], expected)
