"""The learning-rate finder: smoothing, suggestions against theory, the caller's state left
alone, determinism, and the command end to end."""
import itertools
import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cnnjax import assemble, lr_finder, parallel, plots, steps, train
from cnnjax.data import pipeline
from cnnjax.errors import UserError
from experiments import entry
from tests.conftest import make_images

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEP_RATIO = 1e8 ** (1 / 99)  # lr growth per step of the default sweep (1e-7 to 10 in 100)


class Linear(nn.Module):
  """Flattens ``[B, H, W, C]`` and applies one dense layer: ``[B, features]``."""
  features: int

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    del train
    return nn.Dense(self.features)(x.reshape(x.shape[0], -1))


def _max_eigenvalue(features: np.ndarray) -> float:
  """Largest eigenvalue of ``E[x x^T]`` for features ``[N, D]`` with a constant 1 appended
  (the dense layer's bias)."""
  x = np.concatenate([features, np.ones((len(features), 1))], axis=1).astype(np.float64)
  return float(np.linalg.eigvalsh(x.T @ x / len(x)).max())


def test_smooth_is_the_bias_corrected_moving_average():
  np.testing.assert_allclose(lr_finder.smooth(np.full(5, 2.0), 0.9), np.full(5, 2.0))
  np.testing.assert_allclose(lr_finder.smooth(np.array([1.0, 3.0]), 0.9),
                             [1.0, (0.9 * 0.1 + 0.1 * 3.0) / (1 - 0.81)])
  np.testing.assert_array_equal(lr_finder.smooth(np.array([4.0, 1.0, 7.0]), 0.0), [4.0, 1.0, 7.0])


def _mse_step(state: steps.TrainState, batch: dict[str, jax.Array]):
  """Full-batch gradient descent on ``0.5 * mean((f(x) - y)^2)``, with train_step's outputs."""
  def loss_fn(params):
    pred = state.apply_fn({"params": params}, batch["image"])[:, 0]
    return 0.5 * jnp.mean((pred - batch["label"]) ** 2)
  loss, grads = jax.value_and_grad(loss_fn)(state.params)
  count = batch["label"].shape[0]
  return state.apply_gradients(grads=grads), {"loss": loss * count, "count": jnp.asarray(count)}


def test_quadratic_suggestions_bracket_the_stability_limit():
  """Least squares is a quadratic with curvature ``L = lambda_max(E[x x^T])``; gradient
  descent lowers the loss at every step while ``lr < 2/L`` and blows up along the top
  eigenvector above it. So the fastest descent lies below ``2/L`` (and not three decades
  below, where 100 steps barely move the loss), and the smoothed loss, a weighted mean of
  decreasing values, cannot reach its minimum before the lr passes ``2/L``."""
  rng = np.random.default_rng(0)
  x = (rng.normal(size=(64, 6)) * [3.0, 2.0, 1.0, 0.5, 0.3, 0.1]).astype(np.float32)
  y = (x @ rng.normal(size=6) + 0.5).astype(np.float32)
  limit = 2.0 / _max_eigenvalue(x)
  runner = steps.Runner(jax.jit(_mse_step, donate_argnums=0), None, parallel.make_mesh())
  state = steps.create_train_state(Linear(1), optax.sgd(0.0), (1, 1, 6), seed=0)
  batch = {"image": x.reshape(64, 1, 1, 6), "label": y}
  curve = lr_finder.lr_sweep(runner, state, itertools.repeat(batch), optax.sgd)
  assert curve.diverged and len(curve.lrs) < 100
  assert limit / 1000 < curve.lr_steepest < limit
  assert curve.lr_min_div10 * 10 > limit / STEP_RATIO
  assert curve.smoothed[-1] > 4 * curve.smoothed.min()


@pytest.fixture(scope="module")
def softmax_regression():
  """A linear softmax classifier on 4x4 grey images through the Runner's compiled (and
  buffer-donating) ``steps.make_train_step``; returns ``(runner, state, batch, L)`` with
  ``L`` the global curvature bound of the cross-entropy."""
  images, labels = make_images(128, shape=(4, 4, 1), num_classes=4, seed=0)
  normalize = steps.make_normalize(*pipeline.channel_stats(images))
  runner = steps.Runner.create(normalize)
  state = steps.create_train_state(Linear(4), optax.sgd(0.0), (4, 4, 1), seed=0)
  features = np.asarray(normalize(images)).reshape(len(images), -1)
  # The softmax cross-entropy's Hessian in the logits, diag(p) - p p^T, has norm <= 1/2.
  return runner, state, {"image": images, "label": labels}, 0.5 * _max_eigenvalue(features)


def test_softmax_regression_steepest_descent_is_in_the_provable_descent_range(softmax_regression):
  """Cross-entropy of a linear model is convex and L-smooth with ``L`` <= the bound, so
  every step with ``lr < 2/L`` lowers the loss: the steepest drop is found below it."""
  runner, state, batch, curvature = softmax_regression
  curve = lr_finder.lr_sweep(runner, state, itertools.repeat(batch), optax.sgd)
  assert 2 / curvature / 1000 < curve.lr_steepest < 2 / curvature
  assert curve.losses[-1] < 0.5 * curve.losses[0]


def test_sweep_leaves_the_callers_state_untouched_and_repeats_exactly(softmax_regression):
  runner, state, batch, _ = softmax_regression
  state = runner.put_state(state)  # the caller's state on the mesh, as fit() holds it
  before = jax.tree.map(np.array, state)
  first = lr_finder.lr_sweep(runner, state, itertools.repeat(batch), optax.sgd,
                             lr_finder.Sweep(num_steps=30))
  assert not any(leaf.is_deleted() for leaf in jax.tree.leaves(state))
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.array, state), before)
  second = lr_finder.lr_sweep(runner, state, itertools.repeat(batch), optax.sgd,
                             lr_finder.Sweep(num_steps=30))
  np.testing.assert_array_equal(first.losses, second.losses)
  np.testing.assert_array_equal(first.lrs, second.lrs)
  assert len(first.lrs) == 30 and first.lrs[0] == pytest.approx(1e-7)
  assert first.lrs[-1] == pytest.approx(10.0)


@pytest.mark.parametrize("kwargs, match", [
    ({"start_lr": 1.0, "end_lr": 0.1}, r"start_lr=1.0, end_lr=0.1; expected 0 < start_lr < end_lr"),
    ({"num_steps": 2}, r"num_steps=2; expected an integer >= 3"),
    ({"beta": 1.0}, r"beta=1.0; expected a smoothing factor in \[0, 1\)"),
    ({"diverge_factor": 1.0}, r"diverge_factor=1.0; expected a number > 1"),
])
def test_bad_sweep_arguments_are_one_line_errors(kwargs, match):
  with pytest.raises(UserError, match=match):
    lr_finder.Sweep(**kwargs)


def test_a_loss_that_only_rises_has_no_suggestion():
  lrs = np.geomspace(1e-3, 1.0, 20)
  with pytest.raises(UserError, match=r"the loss never decreased during the sweep"):
    lr_finder.suggest(lrs, np.linspace(1.0, 3.0, 20))


def test_valley_is_part_way_down_the_longest_fall_and_every_suggestion_in_the_sweep():
  lrs = np.geomspace(1e-7, 10.0, 100)
  # flat (with noise) to 1e-4, falling from 1e-4 to 1e-1, then diverging
  x = np.log10(lrs)
  noise = np.random.default_rng(0).normal(0.0, 0.01, 100)
  loss = np.where(x < -4, 2.3, np.where(x < -1, 2.3 - 0.6 * (x + 4), 0.5 + 5 * (x + 1) ** 2))
  smoothed = lr_finder.smooth(loss + noise, 0.9)
  start, end, at = lr_finder.valley(smoothed)
  assert lrs[start] < 3e-4 and 3e-2 < lrs[end] < 0.3 and start < at < end
  valley, steepest, min_div10 = lr_finder.suggest(lrs, smoothed)
  assert 1e-4 < valley < 1e-2 and 1e-4 < steepest < 1e-1  # not in the flat, noisy start
  # A minimum at the sweep's start: a tenth of it would lie below the sweep; clipped.
  lrs = np.geomspace(1e-3, 1.0, 30)
  falling_then_flat = np.concatenate([np.linspace(2.0, 1.0, 5), np.linspace(1.0, 1.2, 25)])
  assert min(lr_finder.suggest(lrs, falling_then_flat)) >= lrs[0]


def test_plot_lr_find(tmp_path):
  lrs = np.geomspace(1e-5, 1.0, 30)
  losses = np.concatenate([np.linspace(2.0, 0.5, 25), [1.0, 3.0, 9.0, np.inf, np.nan]])
  path = plots.plot_lr_find(lrs, losses, lr_finder.smooth(losses[:25], 0.9).tolist() + [2.0] * 5,
                            {"steepest": 1e-3, "minimum / 10": 1e-2}, tmp_path / "a/lr.png")
  assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  with pytest.raises(UserError, match=r"losses \(3,\) and smoothed \(30,\); expected \(30,\)"):
    plots.plot_lr_find(lrs, losses[:3], losses, {}, tmp_path / "b.png")


@pytest.mark.slow
def test_find_lr_on_a_config_writes_the_curve_and_repeats(tmp_path, npz_path):
  config = entry.load_config_file(os.path.join(ROOT, "experiments/configs/runlocal.py"))
  config.data.source, config.data.val_size = str(npz_path), 32.0
  config.batch_size, config.optimizer.name = 32, "sgd"
  s = assemble.build(config)
  curve = lr_finder.find_lr(config, s, lr_finder.Sweep(num_steps=40))
  curve.write(tmp_path / "lr")
  saved = json.loads((tmp_path / "lr/lr_find.json").read_text())
  assert (tmp_path / "lr/lr_find.png").read_bytes()[:4] == b"\x89PNG"
  assert len(saved["lr"]) == len(saved["loss"]) == len(saved["smoothed_loss"]) <= 40
  assert saved["lr_steepest"] in saved["lr"] and saved["lr_valley"] in saved["lr"]
  assert curve.summary().startswith(f"LR finder | {len(saved['lr'])} steps")
  # Seeded end to end: the same batches, dropout keys and so the same curve again.
  assert lr_finder.find_lr(config, s, lr_finder.Sweep(num_steps=40)).to_json() == saved


@pytest.mark.slow
def test_command_errors_are_one_line(tmp_path, npz_path):
  proc = subprocess.run(
      [sys.executable, "-m", "experiments.lr_find", "--config", "experiments/configs/runlocal.py",
       "--workdir", str(tmp_path), f"--config.data.source={npz_path}", "--start_lr=1",
       "--end_lr=0.5"], cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2 and proc.stderr.strip() == (
      "error: start_lr=1.0, end_lr=0.5; expected 0 < start_lr < end_lr"), proc.stderr


@pytest.mark.slow
def test_peak_lr_auto_trains_at_the_finders_suggestion(npz_path):
  from experiments.configs import default
  config = default.get_config()
  config.data.source = str(npz_path)
  config.data.val_size = 64.0
  config.batch_size = 32
  config.schedule.peak_lr = "auto"
  run = train.use_lr_finder(assemble.build(config), None)
  expected = lr_finder.find_lr(config, assemble.build(default_with(config, peak_lr=None)))
  assert float(run.schedule(0)) == pytest.approx(expected.suggested, rel=1e-6)
  assert float(run.schedule(0)) != config.optimizer.lr
  config.schedule.peak_lr = "fast"
  with pytest.raises(UserError, match="config.schedule.peak_lr='fast'; expected 'auto'"):
    train.use_lr_finder(assemble.build(config), None)


def default_with(config, peak_lr):
  copy = config.copy_and_resolve_references()
  copy.schedule.peak_lr = peak_lr
  return copy


@pytest.mark.slow
@pytest.mark.parametrize("config_file", ["runlocal", "cifar_seed", "cifar_simple", "cifar_bn_fast",
                                         "lenet", "fashion_lenet", "keras_convnet", "mlp"])
def test_peak_lr_auto_picks_a_rate_that_trains_on_each_small_config(config_file, tmp_path):
  """Each small model's own recipe with peak_lr=auto, two short epochs on learnable images:
  the plot is saved and the training loss ends below chance (log 10 = 2.30; a rate that
  diverges ends far above it). Validation accuracy is not asserted: batch norm's running
  statistics lag after so few steps."""
  config = entry.load_config_file(os.path.join(ROOT, f"experiments/configs/{config_file}.py"))
  shape = (28, 28, 1) if config.data.source in ("mnist", "fashion_mnist") else (32, 32, 3)
  x, y = make_images(640, shape=shape, seed=3)
  np.savez(tmp_path / "d.npz", x_train=x[:512], y_train=y[:512], x_test=x[512:], y_test=y[512:])
  with config.unlocked():
    config.data.source = str(tmp_path / "d.npz")
    config.data.val_size = 64.0
    config.data.limit = 0
    config.num_epochs = 2
    config.eval_rotation = 0.0
    config.schedule.peak_lr = "auto"
  train.train_and_evaluate(config, str(tmp_path / "run"))
  rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
  assert (tmp_path / "run" / "lr_find.png").stat().st_size > 0
  assert np.isfinite(rows[-1]["train_loss"]) and rows[-1]["train_loss"] < 2.25, rows
