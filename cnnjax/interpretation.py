"""Reading a classifier's predictions, as fastai's ``ClassificationInterpretation`` does:
the confusion matrix, the most confused pairs, the top losses, per-class precision/recall/F1.

    interp = learner.interpret()           # the learner's test split (or any labelled data)
    interp.most_confused(5)                # [('cat', 'dog', 41), ...]
    interp.plot_top_losses(9, "top.png")   # or no path: the figure, shown by a notebook
    print(interp.table())                  # per-class precision / recall / F1 / support

``Metrics`` is the dict of test metrics with a readable table as its repr.
"""
import dataclasses
import math
import os
from typing import Any

import numpy as np

from cnnjax import plots
from cnnjax.errors import UserError


def per_class_table(result: dict[str, Any]) -> str:
  """Per-class precision, recall, F1 and support, then the macro averages, as text."""
  names = result["class_names"]
  width = max(8, *(len(n) for n in names))
  lines = [f"{'class':<{width}}  precision  recall  f1      support"]
  for i, name in enumerate(names):
    lines.append(f"{name:<{width}}  {result['precision'][i]:9.4f}  {result['recall'][i]:6.4f}  "
                 f"{result['f1'][i]:6.4f}  {result['support'][i]:7d}")
  lines.append(f"{'macro':<{width}}  {result['macro_precision']:9.4f}  "
               f"{result['macro_recall']:6.4f}  {result['macro_f1']:6.4f}  "
               f"{sum(result['support']):7d}")
  return "\n".join(lines)


class Metrics(dict):
  """Test metrics (the keys of ``test_metrics.json``), shown as a table."""

  def __repr__(self) -> str:
    head = f"accuracy {self['accuracy']:.4f} ({self.get('count', sum(self['support']))})"
    if "test_loss" in self:
      head += f" | loss {self['test_loss']:.4f}"
    return head + "\n" + per_class_table(self)


@dataclasses.dataclass
class ClassificationInterpretation:
  """A model's predictions on a labelled split.

  Attributes:
    probs: ``[N, K]`` class probabilities.
    labels: ``[N]`` true classes.
    images: ``[N, H, W, C]`` uint8, the images the predictions are of.
    class_names: ``K`` names.
  """
  probs: np.ndarray
  labels: np.ndarray
  images: np.ndarray
  class_names: list[str]

  def __post_init__(self):
    self.probs, self.labels = np.asarray(self.probs, np.float64), np.asarray(self.labels)
    if self.probs.shape != (len(self.labels), len(self.class_names)) or len(self.images) != len(self.labels):
      raise UserError(f"probs {self.probs.shape}, labels {self.labels.shape} and "
                      f"{len(self.images)} images; expected [N, {len(self.class_names)}], [N], N")

  @property
  def preds(self) -> np.ndarray:
    """``[N]`` predicted classes."""
    return self.probs.argmax(-1)

  @property
  def losses(self) -> np.ndarray:
    """``[N]`` cross-entropy of each example."""
    p_true = self.probs[np.arange(len(self.labels)), self.labels]
    return -np.log(np.maximum(p_true, np.finfo(np.float64).tiny))

  def confusion_matrix(self) -> np.ndarray:
    """``[K, K]`` counts, rows the true class, columns the prediction."""
    k = len(self.class_names)
    return np.bincount(self.labels * k + self.preds, minlength=k * k).reshape(k, k)

  def most_confused(self, n: int = 5, min_count: int = 1) -> list[tuple[str, str, int]]:
    """The ``n`` most frequent ``(true, predicted, count)`` mistakes, at least ``min_count``."""
    cm = self.confusion_matrix()
    np.fill_diagonal(cm, 0)
    order = np.argsort(-cm, axis=None, kind="stable")[:n]
    pairs = [np.unravel_index(i, cm.shape) for i in order]
    return [(self.class_names[t], self.class_names[p], int(cm[t, p])) for t, p in pairs
            if cm[t, p] >= min_count]

  def top_losses(self, k: int = 9) -> np.ndarray:
    """Indices ``[k]`` of the examples with the highest loss, highest first."""
    return np.argsort(-self.losses, kind="stable")[:k]

  def table(self) -> str:
    """Per-class precision, recall, F1 and support (``per_class_table``)."""
    from cnnjax import metrics  # pylint: disable=import-outside-toplevel
    return per_class_table(metrics.classification_report(self.confusion_matrix(), self.class_names))

  def plot_confusion_matrix(self, path: str | os.PathLike | None = None, normalize: bool = True):
    """The confusion matrix with counts and the accuracy: a PNG at ``path``, else the figure."""
    return plots.plot_confusion(self.confusion_matrix(), self.class_names, path, normalize)

  def plot_top_losses(self, k: int = 9, path: str | os.PathLike | None = None):
    """The ``k`` highest-loss images, each titled ``true -> predicted``, loss and the
    probability of the prediction: a PNG at ``path``, else the figure."""
    top, names = self.top_losses(k), self.class_names
    titles = [f"{names[self.labels[i]]} -> {names[self.preds[i]]}\nloss {self.losses[i]:.2f}, "
              f"p {self.probs[i, self.preds[i]]:.2f}" for i in top]
    return plots.image_grid(self.images[top], path, titles=titles, ncols=math.ceil(math.sqrt(k)),
                            mistakes=self.preds[top] != self.labels[top])
