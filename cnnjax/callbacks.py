"""Hooks into the one training loop (``train.fit``), for the commands and the Learner alike.

A callback subclasses ``Callback`` and overrides what it needs, in the spirit of Keras' and
Lightning's:

- ``on_step_end(step, values)``: every ``log_every_steps`` steps, with the epoch's running
  ``loss``, ``accuracy`` and the step's ``lr``;
- ``on_epoch_end(state, row)``: after each epoch's validation, with its ``metrics.jsonl`` row
  (``epoch, step, train_loss, train_accuracy, val_loss, val_accuracy, lr, seconds``); setting
  ``self.stop_training = True`` ends the loop after this epoch;
- ``on_train_end(state)``: once the loop ends (not when a signal stopped it); may return a
  state to use instead (e.g. the best weights).

``EarlyStopping`` is the one shipped here; the commands read it from ``config.early_stopping``.
"""
import math
from typing import Any, Sequence

import jax

from cnnjax import logs
from cnnjax.errors import UserError


class Callback:
  """Does nothing; override any hook (see the module docstring)."""
  stop_training = False

  def on_step_end(self, step: int, values: dict[str, float]) -> None:
    pass

  def on_epoch_end(self, state: Any, row: dict[str, Any]) -> None:
    pass

  def on_train_end(self, state: Any) -> Any | None:
    return None


class EarlyStopping(Callback):
  """Stops when ``monitor`` has not improved by more than ``min_delta`` for ``patience``
  epochs (Keras' ``EarlyStopping``).

  Args:
    monitor: a key of the epoch rows, e.g. 'val_loss' (lower is better) or 'val_accuracy'
      (higher is better: ``mode='max'``).
    patience: epochs without improvement before stopping, >= 1.
    min_delta: the least change that counts as an improvement.
    mode: 'min' or 'max'.
    restore_best_weights: at the end, the state of the best epoch (kept on the host) replaces
      the last one.
    history: rows of epochs already trained (a resumed run), counted as if seen here.
  """

  def __init__(self, monitor: str = "val_loss", patience: int = 3, min_delta: float = 0.0,
               mode: str = "min", restore_best_weights: bool = False,
               history: Sequence[dict[str, Any]] = ()):
    if mode not in ("min", "max"):
      raise UserError(f"early stopping mode={mode!r}; expected 'min' or 'max'")
    if isinstance(patience, bool) or not isinstance(patience, int) or patience < 1:
      raise UserError(f"early stopping patience={patience!r}; expected an integer >= 1")
    if not min_delta >= 0:
      raise UserError(f"early stopping min_delta={min_delta!r}; expected a number >= 0")
    self.monitor, self.patience, self.min_delta, self.mode = monitor, patience, min_delta, mode
    self.restore_best_weights = restore_best_weights
    self.best, self.best_epoch, self.wait = math.inf if mode == "min" else -math.inf, None, 0
    self.best_state = None
    for row in history:
      self._update(row)

  def _update(self, row: dict[str, Any]) -> bool:
    """Counts ``row``; whether it improved on the best."""
    if self.monitor not in row:
      raise UserError(f"early stopping monitors {self.monitor!r}, which the epoch rows lack; "
                      f"expected one of {sorted(k for k in row if k not in ('epoch', 'step'))}")
    value = row[self.monitor]
    better = (value < self.best - self.min_delta if self.mode == "min"
              else value > self.best + self.min_delta)
    if better:
      self.best, self.best_epoch, self.wait = value, row["epoch"], 0
    else:
      self.wait += 1
    self.stop_training = self.wait >= self.patience
    return better

  def on_epoch_end(self, state: Any, row: dict[str, Any]) -> None:
    if self._update(row) and self.restore_best_weights:
      self.best_state = jax.device_get(state)
    if self.stop_training:
      logs.say(f"Early stopping: {self.monitor} has not improved for {self.wait} epoch(s); best "
               f"{self.best:.4f} at epoch {self.best_epoch}")

  def on_train_end(self, state: Any) -> Any | None:
    return self.best_state if self.restore_best_weights else None
