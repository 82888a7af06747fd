"""Training curves, confusion heatmaps and image grids written as PNG files.

Figures are drawn on matplotlib's Agg canvas directly (``Figure`` + ``FigureCanvasAgg``),
never through ``pyplot``: no display is needed, the caller's pyplot backend (e.g. a
notebook's) is left untouched, and no figure stays registered after a function returns.
Every function writes one PNG to ``path``, creating missing parent folders, and returns
the path it wrote.
"""
import math
import os
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

from typing import TYPE_CHECKING

import numpy as np

from cnnjax.errors import UserError

if TYPE_CHECKING:  # matplotlib is imported at the first figure: not on a run's way to its first step
  from matplotlib.figure import Figure

_DPI = 100
_MISTAKE_COLOR = "tab:red"
# Above this many classes the per-cell numbers of a confusion heatmap are unreadable.
_MAX_ANNOTATED_CLASSES = 30


def _new_figure(width: float, height: float) -> "Figure":
  """A figure of ``width x height`` inches attached to an Agg canvas."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  fig = Figure(figsize=(width, height), dpi=_DPI, layout="constrained")
  FigureCanvasAgg(fig)
  return fig


def _save(fig: "Figure", path: str | os.PathLike | None) -> "pathlib.Path | Figure":
  """Writes ``fig`` as a PNG to ``path`` and returns it as a ``pathlib.Path``; with no path,
  returns the figure (a notebook shows it)."""
  if path is None:
    return fig
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, format="png")
  return path


def _series(history: Sequence[Mapping[str, Any]], key: str) -> tuple[list[float], list[float]]:
  """``(epochs, values)`` of the entries of ``history`` that hold ``key``."""
  rows = [row for row in history if key in row]
  return [float(row["epoch"]) for row in rows], [float(row[key]) for row in rows]


def plot_curves(history: Sequence[Mapping[str, Any]], path: str | os.PathLike,
                step_lrs: Any = None) -> pathlib.Path:
  """Writes ``curves_figure(history, step_lrs)`` as a PNG to ``path`` and returns ``path``."""
  return _save(curves_figure(history, step_lrs), path)


def curves_figure(history: Sequence[Mapping[str, Any]], step_lrs: Any = None) -> "Figure":
  """Loss and accuracy per epoch, train vs validation, plus the learning rate if it varies.

  Args:
    history: one dict per epoch with ``epoch``, ``train_loss``, ``train_accuracy`` and
      optionally ``val_loss``, ``val_accuracy`` and ``lr``; an optional key is drawn at
      the epochs that hold it (e.g. validation every few epochs).
    step_lrs: ``[S]`` the learning rate of every step so far, drawn against fractional
      epochs (``S`` steps over ``history[-1]['epoch']`` epochs): a one-cycle schedule's
      shape, which one value per epoch hides. None: the rows' ``lr``.
  Returns:
    The figure (a notebook displays it): loss, accuracy, and the learning rate unless it
    was constant.
  """
  if isinstance(history, Mapping) or not isinstance(history, Sequence) or not history:
    raise UserError(f"history={history!r:.80}; expected a non-empty list of per-epoch dicts")
  for i, row in enumerate(history):
    if not isinstance(row, Mapping):
      raise UserError(f"history[{i}]={row!r:.80}; expected a dict of per-epoch metrics")
    missing = {"epoch", "train_loss", "train_accuracy"} - set(row)
    if missing:
      raise UserError(
          f"history[{i}] lacks {sorted(missing)}; expected epoch, train_loss, train_accuracy")

  if step_lrs is not None:
    lr_values = np.asarray(step_lrs, np.float64)
    lr_epochs = np.arange(1, len(lr_values) + 1) * history[-1]["epoch"] / max(len(lr_values), 1)
  else:
    lr_epochs, lr_values = (np.asarray(v, np.float64) for v in _series(history, "lr"))
  has_lr = len(lr_values) > 0 and not np.allclose(lr_values, lr_values[0], rtol=1e-6, atol=0)
  num_panels = 3 if has_lr else 2
  fig = _new_figure(4.5 * num_panels, 3.5)
  axes = fig.subplots(1, num_panels)
  for ax, metric, title in ((axes[0], "loss", "Loss"), (axes[1], "accuracy", "Accuracy")):
    for split, style in (("train", "-"), ("val", "--")):
      epochs, values = _series(history, f"{split}_{metric}")
      if epochs:
        label = "train" if split == "train" else "validation"
        ax.plot(epochs, values, style, marker="o", markersize=3, label=label)
    ax.set(title=title, xlabel="epoch", ylabel=metric)
    ax.grid(alpha=0.3)
    ax.legend()
  if has_lr:
    marker = {} if step_lrs is not None else {"marker": "o", "markersize": 3}
    axes[2].plot(lr_epochs, lr_values, color="tab:green", **marker)
    axes[2].set(title="Learning rate" + (" per step" if step_lrs is not None else ""),
                xlabel="epoch", ylabel="lr")
    if lr_values.min() > 0 and lr_values.max() / lr_values.min() > 100:
      axes[2].set_yscale("log")
    axes[2].grid(alpha=0.3)
  from matplotlib import ticker
  for ax in axes:
    ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
  return fig


def plot_confusion(cm: Any, class_names: Sequence[str], path: str | os.PathLike | None,
                   normalize: bool = True) -> pathlib.Path:
  """Heatmap of a confusion matrix, true class down the rows, prediction across.

  Args:
    cm: ``[K, K]`` non-negative counts, rows = true class, columns = predicted class.
    class_names: ``K`` tick labels.
    path: where to write the PNG (None: return the figure).
    normalize: colour and label each cell by its row's fraction (the class's recall on the
      diagonal), its count beneath; rows with no examples stay 0. Otherwise counts alone.
  Returns:
    ``path``. Each cell shows its value when ``K <= 30``; larger matrices are colour only.
    The title gives the accuracy and the number of examples.
  """
  cm = np.asarray(cm)
  if cm.ndim != 2 or cm.shape[0] != cm.shape[1] or cm.shape[0] == 0:
    raise UserError(f"confusion matrix has shape {cm.shape}; expected a square [K, K], K >= 1")
  if not np.issubdtype(cm.dtype, np.number) or (cm < 0).any():
    raise UserError(f"confusion matrix has dtype {cm.dtype}; expected non-negative counts")
  k = cm.shape[0]
  if len(class_names) != k:
    raise UserError(f"class_names has {len(class_names)} entries; expected {k}")

  if normalize:
    totals = cm.sum(axis=1, keepdims=True).astype(np.float64)
    values = np.divide(cm, totals, out=np.zeros(cm.shape), where=totals != 0)
    vmax, fmt = 1.0, "{:.2f}"
  else:
    values = cm
    vmax = max(float(cm.max()), 1.0)
    fmt = "{:d}" if np.issubdtype(cm.dtype, np.integer) else "{:.3g}"

  side = min(max(4.0, 0.45 * k + 2.0), 24.0)
  fig = _new_figure(side + 1.0, side)
  ax = fig.subplots()
  image = ax.imshow(values, cmap="Blues", vmin=0.0, vmax=vmax)
  fig.colorbar(image, ax=ax, shrink=0.8)
  ticks = np.arange(k)
  ax.set_xticks(ticks, [str(name) for name in class_names], rotation=45, ha="right")
  ax.set_yticks(ticks, [str(name) for name in class_names])
  total = int(cm.sum())
  accuracy = np.trace(cm) / total if total else 0.0
  ax.set(xlabel="predicted", ylabel="true",
         title=f"Confusion matrix: accuracy {accuracy:.2%} of {total:,}"
               + (" (rows: fractions, counts)" if normalize else ""))
  if k <= _MAX_ANNOTATED_CLASSES:
    fontsize = 9 if k <= 10 else 6
    counts = normalize and k <= 12  # room for a second line
    for i in range(k):
      for j in range(k):
        color = "white" if values[i, j] > 0.5 * vmax else "black"
        text = fmt.format(values[i, j]) + (f"\n{int(cm[i, j])}" if counts else "")
        ax.text(j, i, text, ha="center", va="center", color=color, fontsize=fontsize)
  return _save(fig, path)


def _as_float_images(images: Any) -> np.ndarray:
  """``[N, H, W, C]`` uint8 or float in ``[0, 1]``, C in {1, 3} -> float64 in ``[0, 1]``."""
  images = np.asarray(images)
  if images.ndim != 4 or images.shape[0] == 0 or images.shape[-1] not in (1, 3):
    raise UserError(f"images have shape {images.shape}; expected [N, H, W, C], N >= 1, C 1 or 3")
  if images.dtype == np.uint8:
    return images.astype(np.float64) / 255.0
  if not np.issubdtype(images.dtype, np.floating):
    raise UserError(f"images have dtype {images.dtype}; expected uint8 or float in [0, 1]")
  low, high = float(images.min()), float(images.max())
  if not (0.0 <= low and high <= 1.0):  # also rejects NaN
    raise UserError(f"float images span [{low:g}, {high:g}]; expected values in [0, 1]")
  return images.astype(np.float64)


def image_grid(images: Any, path: str | os.PathLike | None, titles: Sequence[str] | None = None,
               mistakes: Any = None, ncols: int = 8, title: str | None = None, cell: float = 1.6,
               colorbar: str | None = None) -> pathlib.Path:
  """Images in a grid, optionally titled, wrong predictions framed and titled in red.

  Args:
    images: ``[N, H, W, C]``, uint8 or float in ``[0, 1]``, ``C`` 1 (grey) or 3 (RGB).
    path: where to write the PNG (None: return the figure).
    titles: ``N`` strings (may hold line breaks), e.g. ``"cat -> dog"``.
    mistakes: ``[N]`` bool, True for a wrong prediction.
    ncols: images per row; the grid has ``ceil(N / ncols)`` rows.
    title: the figure's title (what the grid shows).
    cell: inches per image.
    colorbar: a label: adds the 'jet' colour scale from 0 to 1 (heatmap overlays).
  Returns:
    ``path``.
  """
  images = _as_float_images(images)
  n = images.shape[0]
  if titles is not None and len(titles) != n:
    raise UserError(f"titles has {len(titles)} entries; expected {n}, one per image")
  if mistakes is not None:
    mistakes = np.asarray(mistakes)
    if mistakes.shape != (n,) or mistakes.dtype != np.bool_:
      raise UserError(
          f"mistakes has shape {mistakes.shape} and dtype {mistakes.dtype}; expected bool [{n}]")
  if isinstance(ncols, bool) or not isinstance(ncols, (int, np.integer)) or ncols < 1:
    raise UserError(f"ncols={ncols!r}; expected a positive integer")

  cols = min(int(ncols), n)
  rows = math.ceil(n / cols)
  lines = max((str(t).count("\n") + 1 for t in titles), default=0) if titles is not None else 0
  fig = _new_figure(cols * cell + (0.9 if colorbar else 0.0),
                    rows * (cell + 0.3 * lines) + (0.4 if title else 0.0))
  axes = np.asarray(fig.subplots(rows, cols, squeeze=False)).reshape(-1)
  for i, ax in enumerate(axes):
    if i >= n:
      ax.set_axis_off()
      continue
    if images.shape[-1] == 1:
      ax.imshow(images[i, :, :, 0], cmap="gray", vmin=0.0, vmax=1.0)
    else:
      ax.imshow(images[i])
    ax.set_xticks([])
    ax.set_yticks([])
    wrong = mistakes is not None and bool(mistakes[i])
    for spine in ax.spines.values():
      spine.set_visible(wrong)
      spine.set_color(_MISTAKE_COLOR)
      spine.set_linewidth(3)
    if titles is not None:
      ax.set_title(str(titles[i]), fontsize=7 if cell < 2.5 else 9,
                   color=_MISTAKE_COLOR if wrong else "black")
  if title:
    fig.suptitle(title, fontsize=10)
  if colorbar:
    from matplotlib import cm, colors
    mappable = cm.ScalarMappable(colors.Normalize(0.0, 1.0), "jet")
    fig.colorbar(mappable, ax=list(axes[:n]), shrink=0.8, label=colorbar)
  return _save(fig, path)


def plot_lr_find(lrs: Any, losses: Any, smoothed: Any, suggestions: Mapping[str, float],
                 path: str | os.PathLike) -> pathlib.Path:
  """The learning-rate finder's curve: loss against lr on a log axis, suggestions marked.

  Args:
    lrs: ``[T]`` positive learning rates, increasing.
    losses: ``[T]`` raw loss per step (drawn faintly; NaN/inf points are skipped).
    smoothed: ``[T]`` smoothed loss; the y-axis stops at its largest value before its
      minimum, so the divergence after it does not flatten the curve.
    suggestions: label -> lr, each drawn as a vertical line and a dot on the smoothed curve.
    path: where to write the PNG.
  Returns:
    ``path``.
  """
  lrs, losses, smoothed = (np.asarray(a, np.float64) for a in (lrs, losses, smoothed))
  if lrs.ndim != 1 or len(lrs) < 2 or not (lrs > 0).all():
    raise UserError(f"lrs has shape {lrs.shape}; expected [T] positive learning rates, T >= 2")
  if losses.shape != lrs.shape or smoothed.shape != lrs.shape:
    raise UserError(f"losses {losses.shape} and smoothed {smoothed.shape}; expected {lrs.shape} "
                    "like lrs")
  finite = np.isfinite(smoothed)
  if not finite.any():
    raise UserError("smoothed losses are all NaN/inf; expected some finite values")

  fig = _new_figure(6.0, 4.0)
  ax = fig.subplots()
  ax.plot(lrs, losses, color="tab:blue", alpha=0.3, label="loss")
  ax.plot(lrs, smoothed, color="tab:blue", label="smoothed loss")
  colors = ("tab:red", "tab:green", "tab:orange", "tab:purple")
  for i, (label, lr) in enumerate(suggestions.items()):
    color = colors[i % len(colors)]
    ax.axvline(lr, color=color, linestyle="--", linewidth=1)
    ax.plot([lr], [np.interp(np.log(lr), np.log(lrs[finite]), smoothed[finite])], "o",
            color=color, label=f"{label}: {lr:.2g}")
  # y from the lowest loss to the highest smoothed loss before the curve's minimum: the
  # divergence after it (and the raw losses' spikes) would flatten the useful part.
  low = min(smoothed[finite].min(), losses[np.isfinite(losses)].min(initial=np.inf))
  curve = np.where(finite, smoothed, np.nan)
  high = np.nanmax(curve[:int(np.nanargmin(curve)) + 1])
  margin = 0.05 * (high - low) or 0.05 * abs(high) or 0.05
  ax.set_ylim(low - margin, high + margin)
  ax.set_xscale("log")
  ax.set(title="Learning-rate finder", xlabel="learning rate (log scale)", ylabel="training loss")
  ax.grid(alpha=0.3, which="both")
  ax.legend()
  return _save(fig, path)
