"""Classification metrics from integer predictions, in numpy.

Everything derives from one ``[K, K]`` confusion matrix (rows = true class, columns =
predicted class), so a report can be computed once at the end of an evaluation from
matrices summed over batches or hosts. Binary classifiers use ``K = 2`` with class 1 as
the positive class: threshold the sigmoid output (``probs > 0.5``, bool or int) and pass
it as ``preds``; ``precision[1]``, ``recall[1]`` and ``f1[1]`` are then the usual binary
scores.
"""
from collections.abc import Sequence
from typing import Any

import numpy as np

from cnnjax.errors import UserError


def _class_ids(name: str, values: Any, num_classes: int) -> np.ndarray:
  """Checks that ``values`` is a ``[N]`` int or bool array of ids in ``[0, num_classes)``."""
  values = np.asarray(values)
  if values.ndim != 1:
    raise UserError(f"{name} has shape {values.shape}; expected a 1-D array [N]")
  if not (np.issubdtype(values.dtype, np.integer) or values.dtype == np.bool_):
    raise UserError(f"{name} has dtype {values.dtype}; expected integer class ids")
  values = values.astype(np.int64)
  bad = (values < 0) | (values >= num_classes)
  if bad.any():
    raise UserError(
        f"{name} contains {values[bad][0]}; expected class ids in [0, {num_classes})")
  return values


def confusion_matrix(labels: Any, preds: Any, num_classes: int) -> np.ndarray:
  """Counts (true class, predicted class) pairs.

  Args:
    labels: ``[N]`` int (or bool, for binary) true class ids in ``[0, num_classes)``.
    preds: ``[N]`` int (or bool) predicted class ids in ``[0, num_classes)``.
    num_classes: ``K``, at least 1.
  Returns:
    ``[K, K]`` int64; entry ``[i, j]`` counts examples of class ``i`` predicted as ``j``.
  """
  is_int = isinstance(num_classes, (int, np.integer)) and not isinstance(num_classes, bool)
  if not is_int or num_classes < 1:
    raise UserError(f"num_classes={num_classes!r}; expected a positive integer")
  k = int(num_classes)
  labels = _class_ids("labels", labels, k)
  preds = _class_ids("preds", preds, k)
  if labels.shape != preds.shape:
    raise UserError(
        f"preds has {preds.shape[0]} entries but labels has {labels.shape[0]}; expected equal")
  counts = np.bincount(labels * k + preds, minlength=k * k)
  return counts.reshape(k, k).astype(np.int64)


def _divide(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
  """Elementwise ``numerator / denominator`` as float64, 0 where the denominator is 0."""
  numerator = numerator.astype(np.float64)
  denominator = denominator.astype(np.float64)
  out = np.zeros_like(numerator)
  np.divide(numerator, denominator, out=out, where=denominator != 0)
  return out


def classification_report(cm: Any,
                          class_names: Sequence[str] | None = None) -> dict[str, Any]:
  """Accuracy and per-class / macro precision, recall and F1 from a confusion matrix.

  Undefined ratios (a class never predicted, a class with no examples) are 0, as in
  scikit-learn with ``zero_division=0``. Macro averages are unweighted means over all
  ``K`` classes, including classes absent from the data.

  Args:
    cm: ``[K, K]`` non-negative integer counts, rows = true class, columns = predicted.
    class_names: ``K`` names; defaults to ``"0" .. "K-1"``.
  Returns:
    A JSON-serialisable dict of plain Python values: ``accuracy`` (float);
    ``precision``, ``recall``, ``f1`` (``K`` floats each); ``support`` (``K`` ints: true
    examples per class); ``macro_precision``, ``macro_recall``, ``macro_f1`` (floats);
    ``confusion_matrix`` (``K`` lists of ``K`` ints); ``class_names`` (``K`` strings).
  """
  cm = np.asarray(cm)
  if cm.ndim != 2 or cm.shape[0] != cm.shape[1] or cm.shape[0] == 0:
    raise UserError(f"confusion matrix has shape {cm.shape}; expected a square [K, K], K >= 1")
  if not np.issubdtype(cm.dtype, np.integer):
    raise UserError(f"confusion matrix has dtype {cm.dtype}; expected integer counts")
  if (cm < 0).any():
    raise UserError(f"confusion matrix contains {cm.min()}; expected non-negative counts")
  k = cm.shape[0]
  if class_names is None:
    class_names = [str(i) for i in range(k)]
  class_names = [str(name) for name in class_names]
  if len(class_names) != k:
    raise UserError(
        f"class_names has {len(class_names)} entries; expected {k}, one per row of the matrix")

  cm = cm.astype(np.int64)
  true_positives = np.diag(cm)  # [K]
  support = cm.sum(axis=1)  # [K] true examples per class
  predicted = cm.sum(axis=0)  # [K] predictions per class
  precision = _divide(true_positives, predicted)
  recall = _divide(true_positives, support)
  f1 = _divide(2 * true_positives, support + predicted)  # == 2PR / (P + R), sklearn's form
  return {
      "accuracy": float(_divide(true_positives.sum(), cm.sum())),
      "precision": precision.tolist(),
      "recall": recall.tolist(),
      "f1": f1.tolist(),
      "support": support.tolist(),
      "macro_precision": float(precision.mean()),
      "macro_recall": float(recall.mean()),
      "macro_f1": float(f1.mean()),
      "confusion_matrix": cm.tolist(),
      "class_names": class_names,
  }
