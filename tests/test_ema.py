"""Weight averaging (config.ema): the moving average the train step keeps and evaluation uses;
airbench's Lookahead-EMA (config.lookahead), which training restarts from."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cnnjax import assemble, steps
from cnnjax import config as config_lib
from cnnjax.errors import UserError
from cnnjax.models import create_model
from tests.conftest import make_images, tiny_config

IDENTITY = steps.make_normalize(np.zeros(3), np.full(3, 255.0))


def test_the_decay_warms_up_from_the_start():
  assert float(steps.ema_decay(0.999, jnp.asarray(0))) == pytest.approx(0.1)
  assert float(steps.ema_decay(0.999, jnp.asarray(90))) == pytest.approx(0.91)
  assert float(steps.ema_decay(0.999, jnp.asarray(10**6))) == pytest.approx(0.999)


def test_the_step_moves_the_average_towards_the_new_weights_and_evaluation_reads_it():
  state = steps.with_ema(steps.create_train_state(create_model("bn_cnn"), optax.sgd(0.1),
                                                  (32, 32, 3), seed=0))
  state = state.replace(step=jnp.asarray(100))  # decay min(0.5, 101/110) = 0.5
  x, y = make_images(16)
  batch = {"image": jnp.asarray(x), "label": jnp.asarray(y)}
  new, _ = jax.jit(steps.make_train_step(IDENTITY, ema=0.5))(state, batch)
  live = steps.model_variables(new, new.params)
  expected = jax.tree.map(lambda e, v: 0.5 * e + 0.5 * v, state.ema, live)
  for got, want in zip(jax.tree.leaves(new.ema), jax.tree.leaves(expected)):
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
  assert jax.tree.structure(new.ema) == jax.tree.structure(live)  # params and batch_stats
  assert steps.model_variables(new) is new.ema
  # The eval step's logits are the averaged weights' (not the live ones').
  logits = steps.make_predict(IDENTITY)(new, batch["image"])
  averaged = new.apply_fn(new.ema, IDENTITY(batch["image"]), train=False)
  np.testing.assert_allclose(logits, averaged, rtol=1e-5, atol=1e-5)
  assert not np.allclose(logits, new.apply_fn(live, IDENTITY(batch["image"]), train=False))


def test_without_ema_the_state_carries_no_average():
  state = steps.create_train_state(create_model("seed_cnn"), optax.sgd(0.1), (32, 32, 3), seed=0)
  assert state.ema == {}
  assert steps.model_variables(state)["params"] is state.params


def test_a_run_with_ema_is_tested_on_the_average_it_saved(npz_path, tmp_path):
  from cnnjax import evaluate, train
  workdir = tmp_path / "run"
  metrics = train.train_and_evaluate(tiny_config(npz_path, ema=0.9, num_epochs=3), workdir)
  run = assemble.restore(workdir, "latest")
  assert jax.tree.structure(run.state.ema["params"]) == jax.tree.structure(run.state.params)
  averaged = evaluate.probabilities(run, run.state, run.data.test[0])
  live = evaluate.probabilities(run, run.state.replace(ema={}), run.data.test[0])
  assert not np.allclose(averaged, live)
  accuracy = float((averaged.argmax(-1) == run.data.test[1]).mean())
  assert metrics["accuracy"] == pytest.approx(accuracy)


@pytest.mark.parametrize("value", [-0.1, 1.0])
def test_an_ema_out_of_range_is_one_line(npz_path, value):
  with pytest.raises(UserError, match=rf"config.ema={value}; expected a number in \[0, 1\)"):
    config_lib.check(tiny_config(npz_path, ema=value))


def test_lookahead_averages_and_restarts_on_its_period_only():
  average, variables = {"w": jnp.zeros(3)}, {"w": jnp.ones(3)}
  for step in (1, 2, 3, 5, 7):  # not a multiple of the period 4: both unchanged
    a, v = steps.lookahead_update(average, variables, jnp.asarray(step), 0.9, 4, 16)
    np.testing.assert_array_equal(a["w"], 0.0)
    np.testing.assert_array_equal(v["w"], 1.0)
  # step 8 of 16: weight 0.9**4 * (8/16)**3 on the old average; training restarts from it
  a, v = steps.lookahead_update(average, variables, jnp.asarray(8), 0.9, 4, 16)
  weight = 0.9 ** 4 * 0.5 ** 3
  np.testing.assert_allclose(a["w"], 1.0 - weight, rtol=1e-6)
  np.testing.assert_allclose(v["w"], 1.0 - weight, rtol=1e-6)
  # the last step: the full weight
  a, _ = steps.lookahead_update(average, variables, jnp.asarray(16), 0.9, 4, 16)
  np.testing.assert_allclose(a["w"], 1.0 - 0.9 ** 4, rtol=1e-6)


def test_the_train_step_with_lookahead_restarts_from_the_average():
  state = steps.with_ema(steps.create_train_state(create_model("bn_cnn"), optax.sgd(0.1),
                                                  (32, 32, 3), seed=0))
  x, y = make_images(16)
  batch = {"image": jnp.asarray(x), "label": jnp.asarray(y)}
  step = jax.jit(steps.make_train_step(IDENTITY, ema=0.9, lookahead=2, total_steps=2))
  first, _ = step(state, batch)  # step 1: no sync, the average stays the initial weights
  for got, want in zip(jax.tree.leaves(first.ema), jax.tree.leaves(state.ema)):
    np.testing.assert_array_equal(got, want)
  second, _ = step(first, batch)  # step 2 of 2: sync with weight 0.9**2
  plain, _ = jax.jit(steps.make_train_step(IDENTITY))(first.replace(ema={}), batch)
  expected = jax.tree.map(lambda a, v: a + (1 - 0.81) * (v - a), state.ema,
                          steps.model_variables(plain, plain.params))
  for got, want in zip(jax.tree.leaves(second.ema), jax.tree.leaves(expected)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  for got, want in zip(jax.tree.leaves(steps.model_variables(second, second.params)),
                       jax.tree.leaves(second.ema)):
    np.testing.assert_array_equal(got, want)  # training restarts from the average


def test_lookahead_without_an_average_is_one_line(npz_path):
  with pytest.raises(UserError, match=r"^config.lookahead=5 restarts training .* expected config.ema > 0"):
    config_lib.check(tiny_config(npz_path, lookahead=5))


@pytest.mark.slow
def test_a_run_with_lookahead_trains_and_says_so(npz_path, tmp_path, capsys):
  from cnnjax import train
  metrics = train.train_and_evaluate(tiny_config(npz_path, ema=0.9, lookahead=2, num_epochs=2),
                                     tmp_path / "run")
  assert 0 <= metrics["accuracy"] <= 1
  assert "training restarts from it every 2 steps" in capsys.readouterr().out
