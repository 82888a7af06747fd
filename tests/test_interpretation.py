"""The interpretation object and the pictures a user reads: most confused pairs, top losses,
the per-class table, a class-stratified sample of predictions."""
import numpy as np
import pytest

import cnnjax
from cnnjax import evaluate
from cnnjax.interpretation import ClassificationInterpretation, Metrics
from tests.conftest import make_images


@pytest.fixture
def interp():
  labels = np.array([0, 0, 0, 1, 1, 2, 2, 2])
  preds = np.array([0, 1, 1, 1, 0, 2, 1, 2])
  probs = np.full((8, 3), 0.1)
  probs[np.arange(8), preds] = 0.8
  probs[1, 1] = 0.95  # the most confident mistake
  images = np.zeros((8, 4, 4, 1), np.uint8)
  return ClassificationInterpretation(probs, labels, images, ["ant", "bee", "cat"])


def test_most_confused_top_losses_and_table(interp, tmp_path):
  assert interp.most_confused(2) == [("ant", "bee", 2), ("bee", "ant", 1)]
  assert interp.most_confused(9, min_count=2) == [("ant", "bee", 2)]
  np.testing.assert_array_equal(interp.confusion_matrix(), [[1, 2, 0], [1, 1, 0], [0, 1, 2]])
  top = interp.top_losses(3)
  assert top[0] == 1 and all(interp.losses[top[i]] >= interp.losses[top[i + 1]] for i in range(2))
  table = interp.table().splitlines()
  assert table[0].split() == ["class", "precision", "recall", "f1", "support"]
  assert table[1].split()[0] == "ant" and table[1].split()[-1] == "3" and table[-1].startswith("macro")
  assert interp.plot_top_losses(4, tmp_path / "top.png").read_bytes()[:4] == b"\x89PNG"
  assert interp.plot_confusion_matrix(tmp_path / "cm.png").read_bytes()[:4] == b"\x89PNG"
  assert interp.plot_confusion_matrix().axes[0].get_title().startswith("Confusion matrix: accuracy 50.00% of 8")


def test_stratified_sample_takes_the_classes_in_turn():
  labels = np.array([0, 0, 0, 0, 1, 1, 2])  # a sorted folder
  assert evaluate.stratified(labels, 5).tolist() == [0, 4, 6, 1, 5]


@pytest.mark.slow
def test_learner_interpret_and_evaluate_table():
  x, y = make_images(80)
  learner = cnnjax.Learner("seed_cnn", {"train": (x[:64], y[:64]), "test": (x[64:], y[64:])},
                           batch_size=8, val_size=8)
  result = learner.evaluate()
  assert isinstance(result, Metrics) and repr(result).startswith(f"accuracy {result['accuracy']:.4f} (16)")
  interp = learner.interpret()
  assert interp.probs.shape == (16, 10)
  np.testing.assert_array_equal(interp.labels, y[64:])
  assert np.trace(interp.confusion_matrix()) / 16 == pytest.approx(result["accuracy"])
