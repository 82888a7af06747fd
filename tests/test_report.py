"""The evaluation report: its numbers against scikit-learn, the most confident mistakes,
and the whole glue on a one-epoch run."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import optax
import pytest
from sklearn import metrics as sk

from cnnjax import evaluate, steps, train
from cnnjax.errors import UserError
from experiments.configs import default
from tests.conftest import make_images
from tests.test_lr_finder import Linear

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_confident_mistakes_are_the_wrong_predictions_by_decreasing_confidence():
  probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.4, 0.6], [0.3, 0.7], [0.7, 0.3]])
  labels = np.array([0, 0, 0, 1, 1])  # wrong: 1 (p=0.8), 2 (p=0.6), 4 (p=0.7)
  np.testing.assert_array_equal(evaluate.confident_mistakes(probs, labels, 10), [1, 4, 2])
  np.testing.assert_array_equal(evaluate.confident_mistakes(probs, labels, 2), [1, 4])
  assert evaluate.confident_mistakes(probs, probs.argmax(-1), 5).size == 0


def test_evaluate_agrees_with_scikit_learn():
  rng = np.random.default_rng(0)
  probs = rng.dirichlet(np.ones(5), size=200)
  labels = rng.integers(0, 5, 200)
  result = evaluate.metrics(probs, labels, [f"c{k}" for k in range(5)], num_mistakes=7)
  pred = probs.argmax(-1)
  precision, recall, f1, support = sk.precision_recall_fscore_support(
      labels, pred, labels=range(5), zero_division=0)
  np.testing.assert_allclose(result["precision"], precision)
  np.testing.assert_allclose(result["recall"], recall)
  np.testing.assert_allclose(result["f1"], f1)
  assert result["support"] == support.tolist()
  assert result["macro_f1"] == pytest.approx(sk.f1_score(labels, pred, average="macro"))
  assert result["accuracy"] == pytest.approx(sk.accuracy_score(labels, pred))
  assert result["test_loss"] == pytest.approx(sk.log_loss(labels, probs, labels=range(5)))
  assert [m["index"] for m in result["mistakes"]] == evaluate.confident_mistakes(probs, labels, 7).tolist()
  assert all(m["true"] != m["pred"] and m["p"] == probs[m["index"]].max() for m in result["mistakes"])


@pytest.mark.slow
def test_report_of_a_one_epoch_run(tmp_path, npz_path):
  config = default.get_config()
  config.data.source, config.data.val_size = str(npz_path), 32.0
  config.batch_size, config.eval_batch_size, config.num_epochs = 32, 24, 1
  config.eval_flip, config.eval_shift = True, 1  # the report sees the test step's views
  run = tmp_path / "run"
  trained = train.train_and_evaluate(config, run)

  result = evaluate.write_report(run, num_mistakes=5)
  # One epoch, one checkpoint: the report's best checkpoint is the one the run tested.
  assert result["accuracy"] == trained["accuracy"]
  assert result["confusion_matrix"] == trained["confusion_matrix"]
  assert result["test_loss"] == pytest.approx(trained["test_loss"], rel=1e-4)
  wrong = result["count"] - round(result["accuracy"] * result["count"])
  assert len(result["mistakes"]) == min(5, wrong) > 0
  ps = [m["p"] for m in result["mistakes"]]
  assert ps == sorted(ps, reverse=True)
  assert json.loads((run / "report/report.json").read_text()) == result
  for name in ("confusion.png", "mistakes.png"):
    assert (run / "report" / name).read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("loss, outputs", [("cross_entropy", 3), ("binary_cross_entropy", 1)])
def test_predict_proba_pads_the_last_batch_and_cuts_it_off(loss, outputs):
  rng = np.random.default_rng(0)
  params = {"Dense_0": {"kernel": rng.normal(size=(48, outputs)).astype(np.float32),
                        "bias": rng.normal(size=outputs).astype(np.float32)}}
  state = steps.TrainState.create(apply_fn=Linear(outputs).apply, params=params,
                                  tx=optax.sgd(0.0), batch_stats={}, rng=jax.random.PRNGKey(0))
  normalize = steps.make_normalize(np.full(3, 100.0), np.full(3, 50.0))
  images = make_images(11, shape=(4, 4, 3))[0]
  probs = steps.predict_proba(state, normalize, images, batch_size=4, loss=loss)  # 4 + 4 + 3
  logits = np.asarray(normalize(images)).reshape(11, 48) @ params["Dense_0"]["kernel"]
  logits += params["Dense_0"]["bias"]
  expected = (jax.nn.softmax(logits) if outputs > 1
              else np.concatenate([1 - jax.nn.sigmoid(logits), jax.nn.sigmoid(logits)], axis=1))
  np.testing.assert_allclose(probs, expected, rtol=1e-5, atol=1e-6)
  assert probs.shape == (11, max(outputs, 2))


def test_bad_checkpoint_name_is_one_line_error(tmp_path):
  with pytest.raises(UserError, match=r"checkpoint 'last'; expected one of \['best', 'latest'\]"):
    evaluate.write_report(tmp_path, "last")


@pytest.mark.slow
def test_command_on_a_folder_that_is_no_run_is_one_line(tmp_path):
  proc = subprocess.run([sys.executable, "-m", "experiments.report", "--workdir", str(tmp_path)],
                        cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2
  assert proc.stderr.strip() == (f"error: {tmp_path} is not a run directory: no config.json; "
                                 "expected the --workdir of a finished experiment")
