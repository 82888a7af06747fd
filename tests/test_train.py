import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cnnjax import assemble, steps, train
from cnnjax.errors import UserError
from cnnjax.models import create_model
from tests.conftest import make_images, read_events, stop_at_step, tiny_config

IDENTITY = steps.make_normalize(np.zeros(3), np.full(3, 255.0))


def _state(name="bn_cnn", lr=1e-3, seed=0):
  model = create_model(name)
  return steps.create_train_state(model, optax.adam(lr), (32, 32, 3), seed)


def _batch(n=16, seed=0):
  x, y = make_images(n, seed=seed)
  return {"image": jnp.asarray(x), "label": jnp.asarray(y)}


@pytest.mark.slow
def test_train_step_lowers_the_loss_and_updates_batch_stats():
  state = _state("bn_cnn")
  runner = steps.Runner.create(IDENTITY)
  state = runner.put_state(state)
  stats0 = jax.device_get(state.batch_stats)
  batch = runner.to_global(jax.device_get(_batch(32)))
  losses = []
  for _ in range(8):
    state, sums = runner.train_step(state, batch)
    losses.append(float(sums["loss"]) / int(sums["count"]))
  assert losses[-1] < losses[0]
  assert int(state.step) == 8
  moved = jax.tree.map(lambda a, b: not np.allclose(a, b), stats0, jax.device_get(state.batch_stats))
  assert all(jax.tree.leaves(moved))


@pytest.mark.slow
def test_dropout_key_changes_every_step():
  state = _state("seed_cnn", lr=0.0)  # lr 0: params fixed, only the dropout key moves
  step = jax.jit(steps.make_train_step(IDENTITY))
  batch = _batch(16)
  _, a = step(state, batch)
  state = state.replace(step=state.step + 1)
  _, b = step(state, batch)
  assert float(a["loss"]) != float(b["loss"])


def test_label_smoothing_raises_the_loss_of_a_confident_right_answer():
  logits = jnp.array([[10.0, 0.0, 0.0]])
  plain = steps.cross_entropy(logits, jnp.array([0]))
  smooth = steps.cross_entropy(logits, jnp.array([0]), 0.1)
  assert float(smooth[0]) > float(plain[0])


@pytest.mark.slow
def test_evaluate_masks_padding_exactly():
  state = _state("bn_cnn")
  runner = steps.Runner.create(IDENTITY)
  x, y = make_images(37, seed=3)
  padded = runner.evaluate(state, (x, y), batch_size=16)  # 16 + 16 + 5 (11 padding rows)
  whole = runner.evaluate(state, (x, y), batch_size=37)
  assert padded["loss"] == pytest.approx(whole["loss"], rel=1e-5)
  assert padded["accuracy"] == whole["accuracy"]
  assert padded["pred"].shape == (37,)
  np.testing.assert_array_equal(padded["pred"], whole["pred"])


@pytest.mark.slow
def test_eval_flip_averages_the_logits_of_image_and_mirror():
  state = _state("seed_cnn")
  batch = dict(_batch(8), mask=jnp.ones(8, bool))
  logits = lambda x: state.apply_fn({"params": state.params}, IDENTITY(x), train=False)
  mean = (logits(batch["image"]) + logits(batch["image"][:, :, ::-1])) / 2
  assert not np.allclose(mean, logits(batch["image"]), atol=1e-4)  # the mirror matters here
  flipped = steps.make_eval_step(IDENTITY, flip=True)(state, batch)
  losses, pred = steps.loss_and_prediction(mean, batch["label"], "cross_entropy")
  assert float(flipped["loss"]) == pytest.approx(float(losses.sum()), rel=1e-5)
  np.testing.assert_array_equal(flipped["pred"], pred)


@pytest.mark.parametrize("flip", [False, True])
def test_test_time_logits_weigh_the_translated_views_a_quarter_each(flip):
  images = jnp.asarray(make_images(3, shape=(5, 6, 2))[0], jnp.float32)
  weights = jax.random.normal(jax.random.key(0), (5 * 6 * 2, 4))
  logits_of = lambda x: x.reshape(3, -1) @ weights  # sensitive to every pixel's position
  view = lambda x: (logits_of(x) + logits_of(x[:, :, ::-1])) / 2 if flip else logits_of(x)
  padded = np.pad(np.asarray(images), ((0, 0), (1, 1), (1, 1), (0, 0)), mode="reflect")
  down_right, up_left = padded[:, :5, :6], padded[:, 2:, 2:]  # content moved by +1 / -1
  np.testing.assert_array_equal(down_right[:, 1:, 1:], images[:, :-1, :-1])
  expected = view(images) / 2 + view(down_right) / 4 + view(up_left) / 4
  np.testing.assert_allclose(steps.test_time_logits(logits_of, images, flip, shift=1), expected,
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(steps.test_time_logits(logits_of, images, flip), view(images),
                             rtol=1e-6)


def test_eval_shift_beyond_the_image_is_one_clear_error(npz_path):
  with pytest.raises(UserError, match=r"config.eval_shift=32; expected 0 <= eval_shift < the "
                                      r"image side 32"):
    assemble.build(tiny_config(npz_path, eval_shift=32), None)


def test_create_train_state_compiles_once_and_only_outside_a_trace(compiles):
  shapes = jax.eval_shape(lambda: steps.create_train_state(create_model("seed_cnn"),
                                                           optax.adam(1e-3), (8, 8, 3), 0))
  assert compiles == []
  assert all(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in jax.tree.leaves(shapes.params))
  state = steps.create_train_state(create_model("seed_cnn"), optax.adam(1e-3), (8, 8, 3), 0)
  assert compiles == [1]  # keys, variables and optimizer state in one compiled call
  assert jax.tree.structure(state.opt_state) == jax.tree.structure(
      optax.adam(1e-3).init(state.params))


def test_image_shape_that_does_not_fit_the_model_is_one_clear_error():
  with pytest.raises(UserError, match=r"images of shape \(8, 8, 3\) do not fit model BNCNN"):
    steps.create_train_state(create_model("bn_cnn"), optax.adam(1e-3), (8, 8, 3), 0)


@pytest.mark.slow
def test_train_and_evaluate_writes_the_workdir_and_learns(npz_path, tmp_path):
  config = tiny_config(npz_path, num_epochs=4, log_every_steps=2)
  config.optimizer.lr = 3e-3
  result = train.train_and_evaluate(config, tmp_path / "run")
  files = {p.name for p in (tmp_path / "run").iterdir()}
  assert {"config.json", "run_info.json", "metrics.jsonl", "metrics.csv", "curves.png",
          "test_metrics.json", "confusion.png", "predictions.png", "checkpoints"} <= files
  tags = read_events(tmp_path / "run")
  assert tags["train/loss"] == [2, 4, 6, 8, 10, 12, 14, 16]  # every 2 steps (log_every_steps)
  assert tags["val/loss"] == [4, 8, 12, 16] and tags["curves"] == [4, 8, 12, 16]
  assert tags["test/accuracy"] == [16] and tags["confusion"] == tags["predictions"] == [16]
  info = json.loads((tmp_path / "run/run_info.json").read_text())
  assert info["packages"]["jax"] and info["devices"] and info["cpu_count"]
  csv_lines = (tmp_path / "run/metrics.csv").read_text().splitlines()
  assert csv_lines[0].startswith("epoch,step,train_loss") and len(csv_lines) == 5
  rows = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
  assert [r["epoch"] for r in rows] == [1, 2, 3, 4]
  assert rows[-1]["train_loss"] < rows[0]["train_loss"]
  assert result["accuracy"] > 0.3  # chance is 0.1 on the synthetic bands
  assert result["count"] == 64 and result["count_lossless"] == 16
  assert np.array(result["confusion_matrix"]).sum() == 64
  assert {"macro_precision", "macro_recall", "macro_f1", "accuracy_lossless"} <= set(result)


@pytest.mark.slow
def test_interrupted_run_resumes_to_the_same_result(npz_path, tmp_path, monkeypatch):
  config = tiny_config(npz_path)
  straight = train.train_and_evaluate(config, tmp_path / "straight")

  real_create = steps.Runner.create
  stop_at_step(monkeypatch, 3)  # as SIGTERM would, in the first epoch
  stopped = train.train_and_evaluate(config, tmp_path / "resumed")
  assert stopped == {"interrupted": True, "step": 3}
  monkeypatch.setattr(steps.Runner, "create", real_create)
  resumed = train.train_and_evaluate(config, tmp_path / "resumed")
  assert resumed["test_loss"] == pytest.approx(straight["test_loss"], rel=1e-5)
  assert resumed["confusion_matrix"] == straight["confusion_matrix"]


@pytest.mark.slow
def test_workdir_of_a_different_model_is_refused(npz_path, tmp_path):
  config = tiny_config(npz_path, num_epochs=1)
  train.train_and_evaluate(config, tmp_path / "run")
  config.model.name = "lenet"
  with pytest.raises(UserError, match="holds a different run \\(model.name: 'seed_cnn' -> 'lenet'\\)"):
    train.train_and_evaluate(config, tmp_path / "run")


@pytest.mark.slow
def test_workdir_written_before_a_config_key_existed_resumes(npz_path, tmp_path):
  config = tiny_config(npz_path, num_epochs=1)
  train.train_and_evaluate(config, tmp_path / "run")
  saved = json.loads((tmp_path / "run" / "config.json").read_text())
  del saved["data"]["workers"]  # as written by a version without data.workers
  (tmp_path / "run" / "config.json").write_text(json.dumps(saved))
  (tmp_path / "run" / "test_metrics.json").unlink()  # a run stopped before its test
  assert train.train_and_evaluate(config, tmp_path / "run")["count"] > 0


def test_labels_beyond_num_classes_are_refused(npz_path, tmp_path):
  config = tiny_config(npz_path)
  config.model.num_classes = 5
  with pytest.raises(UserError, match=r"data has label 9 but config.model.num_classes=5"):
    train.train_and_evaluate(config, tmp_path / "run")


def test_epoch_line_format():
  row = {"epoch": 3, "train_loss": 0.5, "train_accuracy": 0.8, "val_loss": 0.6,
         "val_accuracy": 0.75, "seconds": 41.23}
  assert train.format_epoch(row, 10) == ("Epoch 3/10 | train_loss 0.5000 | train_acc 0.8000 | "
                                         "val_loss 0.6000 | val_acc 0.7500 | 41.2s")


@pytest.mark.slow
def test_restore_gives_the_trained_state(npz_path, tmp_path):
  config = tiny_config(npz_path, num_epochs=1)
  result = train.train_and_evaluate(config, tmp_path / "run")
  run = assemble.restore(tmp_path / "run", "latest")
  assert run.config.model.name == config.model.name and int(run.state.step) == 4
  out = run.runner.evaluate(run.state, run.data.test, 32)
  assert out["loss"] == pytest.approx(result["test_loss"], rel=1e-5)
  with pytest.raises(UserError, match="is not a run directory"):
    assemble.restore(tmp_path / "nothing")
