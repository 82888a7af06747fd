"""Test metrics from predictions: one path for a run's test report and for ``report``.

``metrics(probs, labels, class_names)`` gives loss, accuracy, per-class and macro
precision/recall/F1, the confusion matrix and the most confident mistakes. ``test_report``
applies it to a run's test set (with its test-time views, named subsets and rotations) at
the end of training; ``write_report`` to a finished run's checkpoint, into ``RUN/report/``:

  ``report.json``    the metrics and the most confident mistakes (index, true, pred, p)
  ``confusion.png``  the row-normalised confusion matrix
  ``mistakes.png``   the most confident mistakes, titled ``"true / pred (p=0.97)"``
"""
import json
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from cnnjax import assemble, logs, plots, steps
from cnnjax import metrics as metrics_lib
from cnnjax.data import augment as augment_lib
from cnnjax.data import sources
from cnnjax.errors import UserError


def confident_mistakes(probs: np.ndarray, labels: np.ndarray, count: int) -> np.ndarray:
  """Indices ``[M]`` (``M <= count``) of wrong predictions, most confident first.

  Args:
    probs: ``[N, K]`` class probabilities.
    labels: ``[N]`` true classes.
    count: how many to return at most.
  Returns:
    Indices of examples whose argmax differs from the label, sorted by decreasing
    probability of the predicted class (ties by index).
  """
  pred = probs.argmax(-1)
  wrong = np.flatnonzero(pred != labels)
  order = np.argsort(-probs[wrong, pred[wrong]], kind="stable")
  return wrong[order[:count]]


def metrics(probs: np.ndarray, labels: np.ndarray, class_names: Sequence[str],
            subsets: Mapping[str, np.ndarray] | None = None, num_mistakes: int = 0) -> dict[str, Any]:
  """Test metrics from probabilities ``[N, K]`` and labels ``[N]``.

  Returns:
    ``metrics.classification_report``'s keys (accuracy, precision, recall, f1, support,
    macro_*, confusion_matrix, class_names), plus ``test_loss`` (mean cross-entropy),
    ``count``, ``accuracy_<name>`` / ``count_<name>`` for each boolean mask ``[N]`` in
    ``subsets`` and, if ``num_mistakes`` > 0, ``mistakes``: up to that many dicts
    ``{index, true, pred, p}``, most confident first.
  """
  probs, labels = np.asarray(probs, np.float64), np.asarray(labels)
  pred = probs.argmax(-1)
  cm = metrics_lib.confusion_matrix(labels, pred, len(class_names))
  p_true = probs[np.arange(len(labels)), labels]
  result = {"test_loss": float(-np.log(np.maximum(p_true, np.finfo(np.float64).tiny)).mean()),
            **metrics_lib.classification_report(cm, class_names)}
  for name, mask in (subsets or {}).items():
    result[f"accuracy_{name}"] = float((pred[mask] == labels[mask]).mean())
    result[f"count_{name}"] = int(mask.sum())
  result["count"] = len(labels)
  if num_mistakes:
    result["mistakes"] = [{"index": int(i), "true": int(labels[i]), "pred": int(pred[i]),
                           "p": float(probs[i, pred[i]])}
                          for i in confident_mistakes(probs, labels, num_mistakes)]
  return result


def probabilities(run: assemble.Run, state: steps.TrainState, inputs: np.ndarray,
                  desc: str = "") -> np.ndarray:
  """Class probabilities ``[N, K]`` of ``inputs`` (as the run's steps see them) with the
  run's test-time views (``eval_flip``, ``eval_shift``)."""
  c = run.config
  return steps.predict_proba(state, run.normalize, inputs, c.eval_batch_size, c.loss,
                             c.eval_flip, c.eval_shift, run.runner.mesh, desc, run.runner.dtype)


def test_report(run: assemble.Run, state: steps.TrainState) -> tuple[dict[str, Any], np.ndarray]:
  """The run's test metrics (``metrics``, with the data's named test subsets, e.g. CIFAR-10's
  1,000 lossless images) and predictions ``[N]``; with ``config.eval_rotation`` > 0 also the
  accuracy on the test set rotated by seeded random angles in ``[-r, r]`` degrees, fill 0."""
  images, labels = run.data.test
  if not len(labels):
    raise UserError("the run has no test examples; expected a test or validation split")
  probs = probabilities(run, state, images, "Test")
  result = metrics(probs, labels, run.data.class_names, run.data.test_subsets)
  rotation = run.config.eval_rotation
  if rotation:
    rotated = augment_lib.random_rotation(images, np.random.default_rng(run.config.seed), rotation,
                                          fill_value=0)
    pred = probabilities(run, state, rotated, "Rotated test").argmax(-1)
    result.update(accuracy_rotated=float((pred == labels).mean()), count_rotated=len(labels),
                  rotation_degrees=rotation)
  return result, probs.argmax(-1)


def write_test_pictures(workdir: pathlib.Path, data: sources.Dataset, result: dict[str, Any],
                        pred: np.ndarray, count: int = 32) -> None:
  """``confusion.png`` and ``predictions.png``: ``count`` test images, the classes in turn
  (``stratified``), each titled ``true -> predicted``, mistakes marked."""
  plots.plot_confusion(np.array(result["confusion_matrix"]), data.class_names, workdir / "confusion.png")
  pick = stratified(data.test[1], count)
  images, labels, names = data.test[0][pick], data.test[1][pick], data.class_names
  titles = [f"{names[t]} -> {names[p]}" for t, p in zip(labels, pred[pick])]
  plots.image_grid(images, workdir / "predictions.png", titles=titles, mistakes=labels != pred[pick])


def stratified(labels: np.ndarray, count: int) -> np.ndarray:
  """Indices of up to ``count`` examples of ``labels`` ``[N]`` taking the classes in turn
  (the first of each class, then the second, ...), so a sorted folder shows every class."""
  labels = np.asarray(labels)
  rank = np.zeros(len(labels), np.int64)  # position of each example within its class
  for c in np.unique(labels):
    members = np.flatnonzero(labels == c)
    rank[members] = np.arange(len(members))
  return np.lexsort((labels, rank))[:count]


def format_test(result: dict[str, Any]) -> str:
  """One line: test accuracy on all examples and on each named subset, and macro F1."""
  parts = [f"Test | loss {result['test_loss']:.4f} | acc {result['accuracy']:.4f} ({result['count']})"]
  parts += [f"acc_{k[len('accuracy_'):]} {v:.4f} ({result['count_' + k[len('accuracy_'):]]})"
            for k, v in result.items() if k.startswith("accuracy_")]
  return " | ".join(parts + [f"macro_f1 {result['macro_f1']:.4f}"])


def write_report(workdir: str | pathlib.Path, which: str = "best",
                 num_mistakes: int = 16) -> dict[str, Any]:
  """Evaluates the ``which`` checkpoint of the run in ``workdir`` on its test set and
  writes ``report.json``, ``confusion.png`` and ``mistakes.png`` (when there are mistakes)
  into ``workdir/report/``. Returns the JSON's content (``metrics``), plus ``which``."""
  run = assemble.restore(workdir, which)
  for note in run.notes:
    logs.say(note)
  inputs, labels = run.data.test  # images, or a backbone's features (config.extract_features)
  if not len(labels):
    raise UserError(f"the run in {workdir} has no test examples; expected a test split")
  probs = probabilities(run, run.state, inputs, "Report")
  images, names = run.images.test[0], run.data.class_names
  result = {"which": which, **metrics(probs, labels, names, num_mistakes=num_mistakes)}
  result.setdefault("mistakes", [])
  out = pathlib.Path(workdir) / "report"
  out.mkdir(exist_ok=True)
  (out / "report.json").write_text(json.dumps(result, indent=2))
  plots.plot_confusion(np.array(result["confusion_matrix"]), names, out / "confusion.png")
  mistakes = result["mistakes"]
  if mistakes:
    titles = [f"{names[m['true']]} / {names[m['pred']]} (p={m['p']:.2f})" for m in mistakes]
    plots.image_grid(images[[m["index"] for m in mistakes]], out / "mistakes.png", titles=titles,
                     mistakes=np.ones(len(mistakes), bool))
  return result


def format_report(result: dict[str, Any]) -> str:
  """One line: checkpoint, accuracy, loss, macro F1 and the number of mistakes shown."""
  return (f"Report ({result['which']} checkpoint) | acc {result['accuracy']:.4f} "
          f"({result['count']}) | loss {result['test_loss']:.4f} | macro_f1 "
          f"{result['macro_f1']:.4f} | {len(result['mistakes'])} most confident mistakes")
