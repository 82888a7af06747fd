import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cnnjax import optim
from cnnjax.errors import UserError
from experiments.configs import default


def _cfg(**overrides):
  c = default.get_config()
  for key, value in overrides.items():
    section, name = key.split("__")
    c[section][name] = value
  return c


PARAMS = {"conv": {"kernel": jnp.ones((3, 3, 2, 4)), "bias": jnp.ones(4)},
          "bn": {"scale": jnp.ones(4), "bias": jnp.ones(4)}}


@pytest.mark.parametrize("name", optim.OPTIMIZERS)
def test_every_optimizer_decreases_a_quadratic(name):
  c = _cfg(optimizer__name=name, optimizer__lr=0.05, optimizer__momentum=0.9)
  tx = optim.make_optimizer(c.optimizer, optim.make_schedule(c.schedule, c.optimizer.lr, 100))
  params = {"w": jnp.array([3.0, -2.0])}
  state = tx.init(params)
  loss = lambda p: (p["w"] ** 2).sum()
  for _ in range(50):
    updates, state = tx.update(jax.grad(loss)(params), state, params)
    params = optax.apply_updates(params, updates)
  assert loss(params) < 0.5 * 13.0


def test_rmsprop_matches_torch_semantics_eps_outside_sqrt():
  # torch.optim.RMSprop(alpha=0.9, eps=1e-7): v = 0.9 v + 0.1 g^2; p -= lr g / (sqrt(v) + eps)
  c = _cfg(optimizer__name="rmsprop", optimizer__lr=0.01)
  tx = optim.make_optimizer(c.optimizer, optim.make_schedule(c.schedule, 0.01, 10))
  g = jnp.array([1e-4])
  updates, _ = tx.update({"w": g}, tx.init({"w": g}), {"w": g})
  expected = -0.01 * 1e-4 / (np.sqrt(0.1 * 1e-8) + 1e-7)
  np.testing.assert_allclose(updates["w"], [expected], rtol=1e-5)


def test_weight_decay_skips_biases_and_batch_norm():
  assert optim.decay_mask(PARAMS) == {"conv": {"kernel": True, "bias": False},
                                      "bn": {"scale": False, "bias": False}}
  for name in ("sgd", "adamw"):
    c = _cfg(optimizer__name=name, optimizer__weight_decay=0.1, optimizer__lr=0.1)
    tx = optim.make_optimizer(c.optimizer, optim.make_schedule(c.schedule, 0.1, 10))
    zero = jax.tree.map(jnp.zeros_like, PARAMS)
    updates, _ = tx.update(zero, tx.init(PARAMS), PARAMS)
    assert float(jnp.abs(updates["conv"]["kernel"]).min()) > 0  # decayed
    for leaf in (updates["conv"]["bias"], updates["bn"]["scale"], updates["bn"]["bias"]):
      np.testing.assert_array_equal(leaf, 0)


@pytest.mark.slow
def test_one_cycle_peaks_at_lr_and_ends_near_zero():
  for anneal in ("cos", "linear"):
    c = _cfg(schedule__name="one_cycle", schedule__anneal=anneal, schedule__pct_start=0.3)
    sched = optim.make_schedule(c.schedule, 0.4, 100)
    values = np.array([sched(i) for i in range(101)])
    assert values.argmax() == 30
    np.testing.assert_allclose(values.max(), 0.4, rtol=1e-6)
    np.testing.assert_allclose(values[0], 0.4 / 25, rtol=1e-6)
    assert values[-1] < 1e-5
  # linear: torch's OneCycleLR(anneal_strategy='linear'), straight from the peak to the end
  c = _cfg(schedule__name="one_cycle", schedule__anneal="linear", schedule__pct_start=0.25,
           schedule__div_factor=5.0, schedule__final_div_factor=2.0)
  sched = optim.make_schedule(c.schedule, 1.0, 100)
  np.testing.assert_allclose([sched(i) for i in (0, 10, 25, 50, 100)],
                             [0.2, 0.52, 1.0, 1.0 - 0.9 * 25 / 75, 0.1], rtol=1e-6)


def test_warmup_cosine():
  c = _cfg(schedule__name="warmup_cosine", schedule__warmup_steps=10)
  sched = optim.make_schedule(c.schedule, 1.0, 110)
  assert float(sched(0)) == 0.0 and float(sched(10)) == pytest.approx(1.0)
  assert float(sched(110)) == pytest.approx(0.0, abs=1e-6)


def test_unknown_names_list_the_valid_ones():
  with pytest.raises(UserError, match=r"unknown optimizer 'adagrad'; expected one of \['sgd', 'rmsprop'"):
    optim.make_optimizer(_cfg(optimizer__name="adagrad").optimizer, optax.constant_schedule(1.0))
  with pytest.raises(UserError, match="unknown schedule 'step'"):
    optim.make_schedule(_cfg(schedule__name="step").schedule, 1.0, 10)
  with pytest.raises(UserError, match="unknown schedule.anneal 'exp'"):
    optim.make_schedule(_cfg(schedule__name="one_cycle", schedule__anneal="exp").schedule, 1.0, 10)


NET = {"backbone": {"conv": {"kernel": jnp.ones((3, 3, 2, 4))}, "bn": {"scale": jnp.ones(4)}},
       "head": {"dense": {"kernel": jnp.ones((4, 2)), "bias": jnp.ones(2)}}}


def test_group_labels_follow_the_rules():
  labels = optim.group_labels(NET, ("backbone/conv/.*:frozen", "backbone/bn/.*:0.1", "head/.*:1"))
  assert labels == {"backbone": {"conv": {"kernel": "frozen"}, "bn": {"scale": "lr*0.1"}},
                    "head": {"dense": {"kernel": "lr*1", "bias": "lr*1"}}}
  assert optim.frozen_modules(NET, ("backbone/conv/.*:frozen", "(?!backbone/conv/).*:1")) == {
      ("backbone", "conv")}  # 'backbone' itself has a trained part
  assert optim.frozen_modules(NET, ()) == frozenset()


def test_parameters_matching_no_rule_or_several_are_listed_in_one_line():
  with pytest.raises(UserError) as info:
    optim.group_labels(NET, ("backbone/.*:frozen", "backbone/bn/.*:1.0"))
  assert str(info.value) == (
      "optimizer.groups ('backbone/.*:frozen', 'backbone/bn/.*:1.0'): of the 4 parameters, "
      "2 match no rule: head/dense/kernel, head/dense/bias; 1 match several: backbone/bn/scale "
      "('backbone/.*:frozen' and 'backbone/bn/.*:1.0'); expected each to match exactly one rule")
  with pytest.raises(UserError, match=r"rule 'backbone/layer5.*:frozen' matches no parameter; "
                     r"expected a regex over whole parameter paths such as 'backbone/conv/kernel'"):
    optim.group_labels(NET, ("backbone/layer5.*:frozen", ".*:1"))


@pytest.mark.parametrize("rule, message", [
    ("backbone", "has no 'regex:value' form"),
    ("(:1", "has a bad regex"),
    (".*:0", "has value '0'; expected 'regex:frozen' or 'regex:<lr multiplier>'"),
    (".*:freeze", "has value 'freeze'"),
])
def test_malformed_rules_are_one_line_errors(rule, message):
  with pytest.raises(UserError, match=message) as info:
    optim.group_labels(NET, (rule,))
  assert "\n" not in str(info.value)


def test_frozen_group_gets_zero_updates_and_no_optimizer_state():
  c = _cfg(optimizer__name="adam", optimizer__groups=("backbone/.*:frozen", "head/.*:1.0"))
  tx = optim.make_optimizer(c.optimizer, optax.constant_schedule(0.1))
  state = tx.init(NET)
  paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(state)[0]]
  assert not any("backbone" in p for p in paths) and any("head" in p for p in paths)
  updates, _ = tx.update(jax.tree.map(jnp.ones_like, NET), state, NET)
  for leaf in jax.tree.leaves(updates["backbone"]):
    np.testing.assert_array_equal(leaf, 0)
  assert all(float(jnp.abs(leaf).min()) > 0 for leaf in jax.tree.leaves(updates["head"]))
