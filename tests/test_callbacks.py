"""Callbacks on the one training loop: EarlyStopping's rule, a user's own hooks, the best
weights restored, fastai's fine_tune, and early stopping in a run from its config."""
import json
import subprocess
import sys

import jax
import numpy as np
import pytest

import cnnjax
from cnnjax import callbacks, optim, train
from cnnjax import config as config_lib
from cnnjax.errors import UserError
from tests.conftest import make_images, tiny_config


def _rows(values, key="val_loss"):
  return [{"epoch": i + 1, "step": 4 * (i + 1), key: v} for i, v in enumerate(values)]


def test_callbacks_are_reached_from_a_plain_import_cnnjax():
  # a fresh process: here the test module has imported cnnjax.callbacks already
  code = "import cnnjax; print(cnnjax.callbacks.EarlyStopping.__name__)"
  done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert done.stdout.strip() == "EarlyStopping"


def test_early_stopping_stops_after_patience_epochs_without_improvement():
  stopper = callbacks.EarlyStopping(patience=2, min_delta=0.01)
  for row in _rows([1.0, 0.8, 0.795, 0.9, 0.7]):
    stopper.on_epoch_end(None, row)
    if stopper.stop_training:
      break
  assert row["epoch"] == 4 and stopper.best == 0.8 and stopper.best_epoch == 2
  higher = callbacks.EarlyStopping("val_accuracy", patience=1, mode="max")
  for row in _rows([0.5, 0.6], "val_accuracy"):
    higher.on_epoch_end(None, row)
  assert not higher.stop_training and higher.best == 0.6
  # A resumed run counts the epochs it already trained.
  assert callbacks.EarlyStopping(patience=2, history=_rows([1.0, 1.1, 1.2])).stop_training


@pytest.mark.parametrize("kwargs,match", [
    ({"patience": 0}, r"patience=0; expected an integer >= 1"),
    ({"mode": "up"}, r"mode='up'; expected 'min' or 'max'"),
    ({"min_delta": -1.0}, r"min_delta=-1.0; expected a number >= 0"),
])
def test_early_stopping_arguments_are_checked(kwargs, match):
  with pytest.raises(UserError, match=match):
    callbacks.EarlyStopping(**kwargs)


def test_a_monitor_the_rows_lack_is_one_error():
  with pytest.raises(UserError, match=r"monitors 'val_los', which the epoch rows lack"):
    callbacks.EarlyStopping("val_los").on_epoch_end(None, _rows([1.0])[0])


class Recorder(callbacks.Callback):
  """Counts the hooks, stops after ``stop_after`` epochs and hands back ``final`` at the end."""

  def __init__(self, stop_after, final=None):
    self.steps, self.epochs, self.stop_after, self.final = [], [], stop_after, final

  def on_step_end(self, step, values):
    self.steps.append((step, sorted(values)))

  def on_epoch_end(self, state, row):
    self.epochs.append(row["epoch"])
    self.stop_training = len(self.epochs) >= self.stop_after

  def on_train_end(self, state):
    return self.final


@pytest.fixture(scope="module")
def data():
  return make_images(96)


@pytest.mark.slow
def test_a_users_callback_sees_steps_and_epochs_stops_the_loop_and_replaces_the_state(data):
  learner = cnnjax.Learner("seed_cnn", data, batch_size=8, val_size=16)  # 10 steps per epoch
  first = jax.device_get(learner.state)
  recorder = Recorder(stop_after=2, final=first)
  history = learner.fit(5, callbacks=[recorder])
  assert recorder.epochs == [1, 2] and len(history) == 2
  assert [s for s, _ in recorder.steps] == [10, 20] and recorder.steps[0][1] == ["accuracy", "loss", "lr"]
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(learner.state.params), first.params)


class Order(callbacks.Callback):
  """The hooks in the order they came: ('step', step, lr) and ('epoch', epoch, lr)."""

  def __init__(self):
    self.seen = []

  def on_step_end(self, step, values):
    self.seen.append(("step", step, values["lr"]))

  def on_epoch_end(self, state, row):
    self.seen.append(("epoch", row["epoch"], row["lr"]))


@pytest.mark.slow
def test_a_log_step_is_reported_before_its_epoch_ends_with_that_step_s_rate(data):
  # fit reads a log step's sums once the next step is queued, and the last one of an epoch
  # before the epoch's end; the rates come from the schedule of each step.
  learner = cnnjax.Learner("seed_cnn", data, batch_size=8, val_size=16)  # 10 steps per epoch
  order = Order()
  learner.fit_one_cycle(2, 0.01, callbacks=[order])
  cfg = config_lib.default_schedule_config()
  cfg.update({"name": "one_cycle", "pct_start": 0.25, "div_factor": 25.0})
  cycle = optim.make_schedule(cfg, 0.01, 20)
  assert [(kind, n) for kind, n, _ in order.seen] == [("step", 10), ("epoch", 1), ("step", 20),
                                                      ("epoch", 2)]
  np.testing.assert_allclose([lr for _, _, lr in order.seen],
                             [cycle(9), cycle(9), cycle(19), cycle(19)], rtol=1e-5)


@pytest.mark.slow
def test_fine_tune_trains_the_head_alone_then_everything(data):
  learner = cnnjax.Learner("seed_cnn", data, batch_size=8, val_size=16)
  body = lambda: jax.device_get(learner.state.params["ConvBlock_0"])
  before = body()
  recorder = Recorder(stop_after=9)
  learner.fine_tune(1, base_lr=1e-3, freeze_epochs=1, callbacks=[recorder])
  assert recorder.epochs == [1, 2] and len(learner.history) == 2
  after = body()
  assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)))
  assert learner.config.optimizer.groups == ("(?!Dense_1/).*:0.01", "Dense_1/.*:1.0")


@pytest.mark.slow
def test_fine_tune_freezes_the_body_for_its_first_epochs(data):
  learner = cnnjax.Learner("seed_cnn", data, batch_size=8, val_size=16)
  before = jax.device_get(learner.state.params)
  learner.freeze()
  learner.fit_one_cycle(1, 1e-3, pct_start=0.99)
  after = jax.device_get(learner.state.params)
  for name in ("ConvBlock_0", "ConvBlock_1", "Dense_0"):
    jax.tree.map(np.testing.assert_array_equal, before[name], after[name])
  assert not np.array_equal(before["Dense_1"]["kernel"], after["Dense_1"]["kernel"])


@pytest.mark.slow
def test_early_stopping_ends_a_run_which_then_counts_as_finished(npz_path, tmp_path, capsys):
  config = tiny_config(npz_path, num_epochs=4)
  # train_loss falls, so with mode='max' no epoch after the first improves on it.
  config.early_stopping.update({"patience": 1, "monitor": "train_loss", "mode": "max"})
  result = train.train_and_evaluate(config, tmp_path / "run")
  out = capsys.readouterr().out
  assert "Early stopping: train_loss has not improved for 1 epoch(s)" in out
  rows = (tmp_path / "run/metrics.jsonl").read_text().splitlines()
  assert [json.loads(r)["epoch"] for r in rows] == [1, 2]
  assert train.train_and_evaluate(config, tmp_path / "run") == result
