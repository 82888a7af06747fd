"""cnnjax.models.dropout: flax's Dropout semantics with masks from 8- or 16-bit draws."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnnjax.models.dropout import Dropout, keep_mask

KEY = jax.random.PRNGKey(0)


@pytest.mark.parametrize("keep, bits", [(0.75, 8), (0.5, 8), (0.8, 16), (0.9, 16), (0.01, 16)])
def test_the_mask_keeps_the_asked_fraction_to_its_quantisation(keep, bits):
  mask, exact = keep_mask(KEY, keep, (64, 32, 32, 16))
  assert mask.dtype == jnp.bool_ and mask.shape == (64, 32, 32, 16)
  assert exact == round(keep * 2 ** bits) / 2 ** bits and abs(exact - keep) <= 2 ** -(bits + 1)
  n = mask.size
  assert abs(float(mask.mean()) - exact) < 5 * np.sqrt(exact * (1 - exact) / n)


def test_the_entries_that_share_a_random_word_are_independent():
  """Four bytes (two half-words) come from one 32-bit word: each lane keeps the same
  fraction, and neighbours are kept together as often as independent draws would be."""
  for keep, lanes in ((0.75, 4), (0.8, 2)):
    mask = np.asarray(keep_mask(KEY, keep, (1 << 20,))[0]).reshape(-1, lanes)
    sigma = np.sqrt(keep * (1 - keep) / mask.shape[0])
    np.testing.assert_allclose(mask.mean(axis=0), keep, atol=5 * sigma)
    both = (mask[:, 0] & mask[:, 1]).mean()
    assert abs(both - keep * keep) < 5 * np.sqrt(keep ** 2 * (1 - keep ** 2) / mask.shape[0])


def test_masks_depend_on_the_key_and_only_on_it():
  a, _ = keep_mask(KEY, 0.5, (1000,))
  b, _ = keep_mask(KEY, 0.5, (1000,))
  c, _ = keep_mask(jax.random.PRNGKey(1), 0.5, (1000,))
  np.testing.assert_array_equal(a, b)
  assert (a != c).mean() > 0.3


@pytest.mark.parametrize("rate", [0.25, 0.2])
def test_train_mode_zeroes_and_rescales_and_keeps_the_mean(rate):
  x = jnp.ones((256, 8, 8, 32))
  y = Dropout(rate).apply({}, x, deterministic=False, rngs={"dropout": KEY})
  keep = keep_mask(KEY, 1 - rate, x.shape)[1]
  values = np.unique(np.asarray(y))
  np.testing.assert_allclose(values, [0.0, 1 / keep], rtol=1e-6)
  assert abs(float(y.mean()) - 1.0) < 0.01


def test_gradient_is_the_mask_over_the_keep_probability():
  x = jax.random.normal(KEY, (32, 100))
  layer = Dropout(0.5)
  grad = jax.grad(lambda v: layer.apply({}, v, deterministic=False,
                                        rngs={"dropout": KEY}).sum())(x)
  y = layer.apply({}, x, deterministic=False, rngs={"dropout": KEY})
  np.testing.assert_array_equal(grad, np.where(np.asarray(y) != 0, 2.0, 0.0))


def test_broadcast_dims_share_one_mask_and_bf16_stays_bf16():
  x = jnp.ones((8, 4, 4, 16), jnp.bfloat16)
  y = Dropout(0.5, broadcast_dims=(1, 2, 3)).apply({}, x, deterministic=False,
                                                   rngs={"dropout": KEY})
  assert y.dtype == jnp.bfloat16
  per_example = np.asarray(y, np.float32).reshape(8, -1)
  assert (per_example == per_example[:, :1]).all()
  assert set(np.unique(per_example)) <= {0.0, 2.0}


def test_inference_rate_zero_and_rate_one():
  x = jnp.arange(12.0).reshape(3, 4)
  np.testing.assert_array_equal(Dropout(0.5, deterministic=True).apply({}, x), x)
  np.testing.assert_array_equal(Dropout(0.0).apply({}, x, deterministic=False), x)
  dropped = Dropout(1.0).apply({}, x, deterministic=False, rngs={"dropout": KEY})
  np.testing.assert_array_equal(dropped, np.zeros_like(x))
