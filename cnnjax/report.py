"""Evaluation report of a finished run: metrics, confusion heatmap, most confident mistakes.

``write_report(workdir)`` restores the run's best (or latest) checkpoint, computes class
probabilities on its test set and writes into ``workdir/report/``:

  ``report.json``    accuracy, loss, per-class and macro precision/recall/F1, the confusion
                     matrix and the most confident mistakes (index, true, pred, p)
  ``confusion.png``  the row-normalised confusion matrix
  ``mistakes.png``   the most confident mistakes, titled ``"true / pred (p=0.97)"``
"""
import json
import pathlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from cnnjax import inference, plots, train
from cnnjax import metrics as metrics_lib
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


def evaluate(probs: np.ndarray, labels: np.ndarray, class_names: Sequence[str],
             num_mistakes: int = 16) -> dict[str, Any]:
  """The report's numbers from probabilities ``[N, K]`` and labels ``[N]``.

  Returns:
    ``metrics.classification_report``'s keys (accuracy, precision, recall, f1, support,
    macro_*, confusion_matrix, class_names), plus ``test_loss`` (mean cross-entropy),
    ``count`` and ``mistakes``: up to ``num_mistakes`` dicts ``{index, true, pred, p}``,
    most confident first.
  """
  probs, labels = np.asarray(probs, np.float64), np.asarray(labels)
  pred = probs.argmax(-1)
  cm = metrics_lib.confusion_matrix(labels, pred, len(class_names))
  result = metrics_lib.classification_report(cm, class_names)
  p_true = probs[np.arange(len(labels)), labels]
  result["test_loss"] = float(-np.log(np.maximum(p_true, np.finfo(np.float64).tiny)).mean())
  result["count"] = len(labels)
  result["mistakes"] = [{"index": int(i), "true": int(labels[i]), "pred": int(pred[i]),
                         "p": float(probs[i, pred[i]])}
                        for i in confident_mistakes(probs, labels, num_mistakes)]
  return result


def write_report(workdir: str | pathlib.Path, which: str = "best",
                 num_mistakes: int = 16) -> dict[str, Any]:
  """Evaluates the ``which`` checkpoint of the run in ``workdir`` on its test set and
  writes ``report.json``, ``confusion.png`` and ``mistakes.png`` (when there are mistakes)
  into ``workdir/report/``, with the run's test-time views (``eval_flip``, ``eval_shift``)
  as its test step used them. Returns the JSON's content (see ``evaluate``), plus ``which``."""
  config, s = train.restore_run(workdir, which)
  inputs, labels = s.data.test  # images, or a backbone's features (config.extract_features)
  if not len(labels):
    raise UserError(f"the run in {workdir} has no test examples; expected a test split")
  probs = inference.predict_proba(s.state, s.normalize, inputs, config.eval_batch_size,
                                  config.loss, config.eval_flip, config.eval_shift)
  images, names = s.images.test[0], s.data.class_names
  result = {"which": which, **evaluate(probs, labels, names, num_mistakes)}
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
