import os
import runpy
import sys

import jax
import numpy as np
import pytest

import cnnjax
from cnnjax import lr_finder, train
from cnnjax.errors import UserError
from experiments.configs import cifar_seed
from tests.conftest import make_images

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_learner_matches_the_experiment_config_for_the_same_seed(npz_path, tmp_path):
  config = cifar_seed.get_config()
  config.data.source = str(npz_path)
  config.data.val_size = 64.0
  config.batch_size = 32
  config.num_epochs = 2
  expected = train.train_and_evaluate(config, tmp_path / "run")
  learner = cnnjax.Learner("seed_cnn", npz_path, optimizer="rmsprop", lr=1e-3, batch_size=32, val_size=64)
  history = learner.fit(epochs=2)
  assert len(history) == 2 and learner.epoch == 2
  result = learner.evaluate()
  assert result["test_loss"] == pytest.approx(expected["test_loss"], rel=1e-5)
  assert result["confusion_matrix"] == expected["confusion_matrix"]


@pytest.mark.slow
def test_fit_predict_history_save_load(tmp_path):
  x, y = make_images(96, seed=4)
  learner = cnnjax.Learner("seed_cnn", (x, y), optimizer="adam", lr=3e-3, batch_size=16, val_size=32)
  # before training: a sweep over a trained model's flat loss may find no decrease to suggest
  curve = learner.lr_find(lr_finder.Sweep(num_steps=20))
  assert len(curve.lrs) <= 20 and curve.lr_min_div10 > 0 and int(learner.state.step) == 0
  history = learner.fit_one_cycle(2, max_lr=3e-3)
  history = learner.fit(1)
  table = history.to_dict()
  assert table["epoch"] == [1, 2, 3] and len(table["val_loss"]) == 3
  assert table["lr"][0] < table["lr"][1] or table["lr"][0] > table["lr"][1]  # one-cycle moved it
  assert table["lr"][2] == pytest.approx(3e-3)
  assert history.to_csv(tmp_path / "h.csv").read_text().splitlines()[0].startswith("epoch,step")
  assert (history.plot(tmp_path / "curves.png")).stat().st_size > 0
  assert type(history.plot()).__name__ == "Figure"
  probs = learner.predict(x[:10])
  assert probs.shape == (10, 10)
  np.testing.assert_allclose(probs.sum(1), 1, rtol=1e-5)
  learner.save(tmp_path / "saved")
  restored = cnnjax.Learner.load(tmp_path / "saved")
  np.testing.assert_allclose(restored.predict(x[:10]), probs, rtol=1e-5, atol=1e-6)
  assert len(restored.history) == 3
  again = cnnjax.Learner.load(tmp_path / "saved", data=(x, y), batch_size=16, val_size=32)
  again.fit(1)  # training continues from the restored step and optimizer state
  assert again.epoch == 4 and len(again.history) == 4


@pytest.mark.slow
def test_bad_calls_are_one_clear_error():
  x, y = make_images(40)
  with pytest.raises(UserError, match=r"unknown optimizer 'adagrad'"):
    cnnjax.Learner("seed_cnn", (x, y), optimizer="adagrad", batch_size=8)
  with pytest.raises(UserError, match=r"images have shape \(40, 32, 32, 3\) and dtype float32; expected uint8"):
    cnnjax.Learner("seed_cnn", (x.astype(np.float32), y), batch_size=8)
  with pytest.raises(UserError, match=r"batch_size=128 is larger than the 32 training examples"):
    cnnjax.Learner("seed_cnn", (x, y), val_size=8)
  with pytest.raises(UserError, match=r"data has label 9 but config.model.num_classes=5; expected labels in \[0, 5\)"):
    cnnjax.Learner("seed_cnn", (x, y), num_classes=5, batch_size=8)
  with pytest.raises(UserError, match=r"has 40 images but 39 labels"):
    cnnjax.Learner("seed_cnn", (x, y[:-1]), batch_size=8)
  learner = cnnjax.Learner("seed_cnn", (x, y), batch_size=8, val_size=8)
  with pytest.raises(UserError, match="no test data"):
    learner.evaluate()


@pytest.mark.slow
def test_example_script_runs_end_to_end(npz_path, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  monkeypatch.setattr(sys, "argv", ["cifar_seed.py", str(npz_path)])
  source = open(os.path.join(ROOT, "examples/cifar_seed.py")).read()
  code_lines = [line for line in source.split('"""')[2].splitlines() if line.strip()]
  assert len(code_lines) < 15
  runpy.run_path(os.path.join(ROOT, "examples/cifar_seed.py"), run_name="__main__")
  assert (tmp_path / "runs/cifar_seed_example/curves.png").stat().st_size > 0


@pytest.mark.slow
def test_fine_tune_example_runs_lr_find_to_predict(npz_path, tmp_path, monkeypatch, capsys):
  monkeypatch.setattr(sys, "argv", ["fine_tune.py", str(npz_path), str(tmp_path / "out")])
  runpy.run_path(os.path.join(ROOT, "examples/fine_tune.py"), run_name="__main__")
  out = capsys.readouterr().out
  assert "LR finder |" in out and "Epoch 3/3" in out and "image 0: " in out
  for name in ("lr_find.png", "top_losses.png", "confusion.png"):
    assert (tmp_path / "out" / name).read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_freeze_trains_only_the_head_and_unfreeze_everything():
  x, y = make_images(64, seed=5)
  learner = cnnjax.Learner("bn_cnn", (x, y), batch_size=16, val_size=16)
  learner.freeze()  # all but the last top-level module: the final Dense
  before = jax.device_get(learner.state)
  learner.fit(1)
  after = jax.device_get(learner.state)
  head = list(before.params)[-1]
  for name in before.params:
    same = jax.tree.leaves(jax.tree.map(np.array_equal, before.params[name], after.params[name]))
    assert all(same) == (name != head), name
  stats_same = jax.tree.leaves(jax.tree.map(np.array_equal, before.batch_stats, after.batch_stats))
  assert all(stats_same)  # frozen BN layers run in inference mode
  learner.unfreeze()
  learner.fit(1)
  moved = jax.tree.map(lambda a, b: not np.array_equal(a, b), after.params, jax.device_get(learner.state).params)
  assert all(jax.tree.leaves(moved))


@pytest.mark.slow
def test_a_pretrained_learner_starts_frozen_as_fastais(tmp_path):
  from cnnjax.models import ResNet18
  from tests.test_weights import _random_variables, _state_dict
  path = tmp_path / "resnet18.npz"
  np.savez(path, **_state_dict(_random_variables(ResNet18())))
  x, y = make_images(48, seed=6)
  learner = cnnjax.Learner("transfer", (x, y), batch_size=16, val_size=16, pretrained=str(path),
                           model_options={"backbone": "resnet18", "hidden": ()})
  before = jax.device_get(learner.state.params)
  learner.fit(1)
  after = jax.device_get(learner.state.params)
  assert set(before) == {"backbone", "head"}
  for name, expect_same in (("backbone", True), ("head", False)):
    same = jax.tree.leaves(jax.tree.map(np.array_equal, before[name], after[name]))
    assert all(same) == expect_same, name


def test_precision_and_ema_are_learner_arguments(tmp_path, monkeypatch):
  from cnnjax import runtime
  monkeypatch.setattr(runtime, "cpu_has_bf16", lambda cpuinfo=None: True)
  x, y = make_images(96, seed=4)
  learner = cnnjax.Learner("seed_cnn", (x, y), lr=3e-3, batch_size=16, val_size=32,
                           precision="bfloat16", ema=0.9)
  assert learner.config.precision == "bfloat16" and learner.config.ema == 0.9
  assert learner.run.runner.dtype == "bfloat16"
  learner.fit(1)
  probs = learner.predict(x[:5])
  assert probs.shape == (5, 10) and np.allclose(probs.sum(-1), 1, atol=1e-3)
  # Predictions come from the moving average, not the live weights.
  live = cnnjax.steps.predict_proba(learner.state.replace(ema={}), learner.run.normalize, x[:5],
                                    dtype="bfloat16")
  assert not np.allclose(probs, live)
  learner.save(tmp_path / "saved")
  again = cnnjax.Learner.load(tmp_path / "saved")
  np.testing.assert_allclose(again.predict(x[:5]), probs, atol=1e-6)
  with pytest.raises(UserError, match=r"^precision='half'; expected one of \['auto', 'float32', 'bfloat16'\]$"):
    cnnjax.Learner("seed_cnn", (x, y), precision="half")
  with pytest.raises(UserError, match=r"^ema=1.5; expected a number in \[0, 1\)$"):
    cnnjax.Learner("seed_cnn", (x, y), ema=1.5)
