"""cnnjax.metrics against scikit-learn (a test-only dependency)."""
import json

import numpy as np
import pytest
from sklearn import metrics as skm

from cnnjax import metrics
from cnnjax.errors import UserError

NUM_CLASSES = 6


def _random_predictions(seed: int) -> tuple[np.ndarray, np.ndarray]:
  """``labels, preds [200]``: class 4 never predicted, class 5 absent from the labels.

  Odd seeds also drop class 3 from both, so one class has neither examples nor predictions.
  """
  rng = np.random.default_rng(seed)
  label_classes = [0, 1, 2, 3, 4] if seed % 2 == 0 else [0, 1, 2, 4]
  pred_classes = [0, 1, 2, 3, 5] if seed % 2 == 0 else [0, 1, 2, 5]
  labels = rng.choice(label_classes, size=200)
  # Mostly right, so per-class scores differ from chance; the rest random.
  preds = np.where(rng.random(200) < 0.6, labels, rng.choice(pred_classes, size=200))
  preds = np.where(preds == 4, rng.choice(pred_classes, size=200), preds)
  return labels, preds


@pytest.mark.parametrize("seed", range(6))
def test_matches_sklearn(seed):
  labels, preds = _random_predictions(seed)
  assert 4 in labels and 4 not in preds and 5 in preds and 5 not in labels
  all_classes = list(range(NUM_CLASSES))

  cm = metrics.confusion_matrix(labels, preds, NUM_CLASSES)
  assert cm.dtype == np.int64 and cm.shape == (NUM_CLASSES, NUM_CLASSES)
  np.testing.assert_array_equal(cm, skm.confusion_matrix(labels, preds, labels=all_classes))

  report = metrics.classification_report(cm)
  p, r, f, s = skm.precision_recall_fscore_support(
      labels, preds, labels=all_classes, zero_division=0)
  np.testing.assert_allclose(report["precision"], p, rtol=0, atol=1e-12)
  np.testing.assert_allclose(report["recall"], r, rtol=0, atol=1e-12)
  np.testing.assert_allclose(report["f1"], f, rtol=0, atol=1e-12)
  assert report["support"] == s.tolist()
  macro = skm.precision_recall_fscore_support(
      labels, preds, labels=all_classes, average="macro", zero_division=0)
  assert report["macro_precision"] == pytest.approx(macro[0], abs=1e-12)
  assert report["macro_recall"] == pytest.approx(macro[1], abs=1e-12)
  assert report["macro_f1"] == pytest.approx(macro[2], abs=1e-12)
  assert report["accuracy"] == pytest.approx(skm.accuracy_score(labels, preds), abs=1e-12)
  assert report["confusion_matrix"] == cm.tolist()


def test_report_is_plain_json():
  cm = metrics.confusion_matrix([0, 1, 2, 2], [0, 2, 2, 1], 3)
  report = metrics.classification_report(cm, class_names=["cat", "dog", "frog"])
  assert json.loads(json.dumps(report)) == report
  assert report["class_names"] == ["cat", "dog", "frog"]
  assert all(type(v) is float for v in report["precision"] + [report["accuracy"]])
  assert all(type(v) is int for v in report["support"])
  assert metrics.classification_report(cm)["class_names"] == ["0", "1", "2"]


def test_binary_from_thresholded_sigmoid():
  rng = np.random.default_rng(0)
  labels = rng.random(100) < 0.3
  probs = np.clip(labels * 0.4 + rng.random(100) * 0.6, 0, 1)
  preds = probs > 0.5  # bool, as a sigmoid head gives it
  report = metrics.classification_report(metrics.confusion_matrix(labels, preds, 2))
  assert report["precision"][1] == pytest.approx(skm.precision_score(labels, preds), abs=1e-12)
  assert report["recall"][1] == pytest.approx(skm.recall_score(labels, preds), abs=1e-12)
  assert report["f1"][1] == pytest.approx(skm.f1_score(labels, preds), abs=1e-12)


def test_empty_matrix_gives_zeros():
  empty = np.zeros(0, np.int32)
  report = metrics.classification_report(metrics.confusion_matrix(empty, empty, 2))
  assert report["accuracy"] == 0.0 and report["macro_f1"] == 0.0
  assert report["support"] == [0, 0]


@pytest.mark.parametrize("labels, preds, num_classes, match", [
    ([0, 3], [0, 1], 3, "labels contains 3"),
    ([0, 1], [-1, 1], 3, "preds contains -1"),
    ([0, 1], [0.0, 1.0], 3, "preds has dtype float64"),
    ([0, 1, 2], [0, 1], 3, "preds has 2 entries but labels has 3"),
    ([[0, 1]], [[0, 1]], 3, r"labels has shape \(1, 2\)"),
    ([0, 1], [0, 1], 0, "num_classes=0"),
])
def test_confusion_matrix_rejects_bad_input(labels, preds, num_classes, match):
  with pytest.raises(UserError, match=match):
    metrics.confusion_matrix(np.asarray(labels), np.asarray(preds), num_classes)


@pytest.mark.parametrize("cm, names, match", [
    (np.zeros((2, 3), int), None, r"shape \(2, 3\)"),
    (np.zeros((2, 2)), None, "dtype float64"),
    (np.array([[1, -1], [0, 1]]), None, "contains -1"),
    (np.eye(3, dtype=int), ["a", "b"], "class_names has 2 entries; expected 3"),
])
def test_report_rejects_bad_input(cm, names, match):
  with pytest.raises(UserError, match=match):
    metrics.classification_report(cm, names)
