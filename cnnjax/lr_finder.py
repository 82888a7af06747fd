"""Learning-rate finder: train briefly while the learning rate grows exponentially.

Leslie Smith's range test as fastai runs it: starting from the current weights, take one
optimizer step per batch with the learning rate growing from ``start_lr`` to ``end_lr``
(1e-7 to 10 over 100 steps by default), record the loss, smooth it with a bias-corrected
exponential moving average and stop once the smoothed loss exceeds 4x its minimum (the
run diverged). Three suggestions come from the smoothed curve (``suggest``): fastai's
``valley`` (the default, ``LRCurve.suggested``), the steepest descent inside that valley, and
the minimum divided by 10; each lies within the swept range.

The sweep runs the run's own compiled ``train_step`` (``steps.make_train_step`` through
``steps.Runner``) and the config's optimizer (``optim.make_optimizer``) driven by the
sweeping schedule, on a fresh copy of the train state: the caller's state is never
modified, even though the compiled step donates its input buffers.
"""
import dataclasses
import functools
import itertools
import json
import math
import os
import pathlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from cnnjax import assemble, optim, plots, progress, steps
from cnnjax.data import pipeline
from cnnjax.errors import UserError


@dataclasses.dataclass(frozen=True)
class LRCurve:
  """The result of a sweep.

  Attributes:
    lrs: ``[T]`` the learning rate of each step taken (``T <= num_steps``).
    losses: ``[T]`` the mean training loss of each step's batch, before its update.
    smoothed: ``[T]`` bias-corrected exponential moving average of ``losses``.
    diverged: True if the sweep stopped early because the smoothed loss exceeded
      ``diverge_factor`` times its minimum (or became NaN/inf).
    lr_valley: fastai's ``valley``: part-way down the longest stretch over which the smoothed
      loss keeps falling (see ``suggest``); what ``schedule.peak_lr='auto'`` uses.
    lr_steepest: the lr where the smoothed loss falls fastest per unit of ``log(lr)``
      inside that stretch (outside it the slope is mostly noise).
    lr_min_div10: the lr at the minimum of the smoothed loss, divided by 10.
  """
  lrs: np.ndarray
  losses: np.ndarray
  smoothed: np.ndarray
  diverged: bool
  lr_valley: float
  lr_steepest: float
  lr_min_div10: float

  @property
  def suggested(self) -> float:
    """The suggestion to use: ``lr_valley``."""
    return self.lr_valley

  @property
  def suggestions(self) -> dict[str, float]:
    """Label -> lr of the three suggestions (the plot's legend)."""
    return {"valley": self.lr_valley, "steepest": self.lr_steepest,
            "minimum / 10": self.lr_min_div10}

  def summary(self) -> str:
    """One line: steps taken, where the sweep ended, the suggestions."""
    end = "diverged" if self.diverged else "did not diverge"
    return (f"LR finder | {len(self.lrs)} steps, {end} at lr {self.lrs[-1]:.3g} | valley "
            f"{self.lr_valley:.3g} | steepest {self.lr_steepest:.3g} | minimum/10 "
            f"{self.lr_min_div10:.3g}")

  def write(self, workdir: str | os.PathLike) -> None:
    """``workdir/lr_find.json`` (``to_json()``) and ``workdir/lr_find.png`` (the curve)."""
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "lr_find.json").write_text(json.dumps(self.to_json(), indent=2))
    plots.plot_lr_find(self.lrs, self.losses, self.smoothed, self.suggestions, workdir / "lr_find.png")

  def to_json(self) -> dict[str, Any]:
    """The curve and suggestions as plain Python values (non-finite losses become None)."""
    def floats(values: np.ndarray) -> list[float | None]:
      return [float(v) if math.isfinite(v) else None for v in values]
    return {"lr": floats(self.lrs), "loss": floats(self.losses), "smoothed_loss": floats(self.smoothed),
            "diverged": self.diverged, "lr_valley": self.lr_valley,
            "lr_steepest": self.lr_steepest, "lr_min_div10": self.lr_min_div10}


def smooth(losses: np.ndarray, beta: float) -> np.ndarray:
  """fastai's smoothing: ``avg = beta * avg + (1 - beta) * loss``, divided by ``1 - beta**t``.

  Args:
    losses: ``[T]``.
    beta: the moving average's decay in ``[0, 1)``; 0 returns ``losses`` unchanged.
  Returns:
    ``[T]`` float64; entry ``t`` is a weighted mean of ``losses[:t + 1]``.
  """
  out = np.empty(len(losses))
  avg = 0.0
  for t, loss in enumerate(losses):
    avg = beta * avg + (1.0 - beta) * float(loss)
    out[t] = avg / (1.0 - beta ** (t + 1))
  return out


def valley(smoothed: np.ndarray) -> tuple[int, int, int]:
  """fastai's ``valley``: ``(start, end, index)`` of the longest decreasing subsequence of the
  smoothed loss ``[T]`` (its first and last steps) and the step ``index`` half-way into its
  middle third."""
  n = len(smoothed)
  length = np.ones(n, int)  # length[i]: the longest decreasing subsequence ending at i
  for i in range(1, n):
    lower = smoothed[:i] > smoothed[i]
    if lower.any():
      length[i] = length[:i][lower].max() + 1
  end = int(np.argmax(length))
  start = end - int(length[end]) + 1
  third = (end - start) / 3
  return start, end, start + int(third) + int(third / 2)


def suggest(lrs: np.ndarray, smoothed: np.ndarray) -> tuple[float, float, float]:
  """``(lr_valley, lr_steepest, lr_min_div10)`` of a smoothed loss curve ``[T]`` over
  ``lrs`` ``[T]``, each clipped to ``[lrs[0], lrs[-1]]``.

  The valley is fastai's (``valley``), over the finite part of the curve. The steepest descent
  is the most negative finite difference of the smoothed loss per unit of ``log(lr)`` inside
  the valley's stretch, taken at the left end of that interval (the lr of the step whose
  update made the drop). The minimum skips the first tenth of the curve, as fastai does: its
  moving average rests on too few losses.
  """
  bad = ~np.isfinite(smoothed)  # a diverged sweep's last step may be NaN/inf
  finite = int(np.argmax(bad)) if bad.any() else len(smoothed)
  curve = smoothed[:finite]
  start = len(curve) // 10
  best = start + int(np.argmin(curve[start:]))
  if best == start:
    raise UserError(f"the loss never decreased during the sweep from lr {lrs[start]:.3g} to "
                    f"{lrs[finite - 1]:.3g}; expected a lower start_lr or a learnable problem")
  low, high, at = valley(curve)
  if high == low:  # no decrease at all: the steepest descent is searched up to the minimum
    low, high = start, best
  slopes = np.diff(curve[low:high + 1]) / np.diff(np.log(lrs[low:high + 1]))
  clip = lambda lr: float(np.clip(lr, lrs[0], lrs[-1]))
  return clip(lrs[at]), clip(lrs[low + int(np.argmin(slopes))]), clip(lrs[best] / 10.0)


@dataclasses.dataclass(frozen=True)
class Sweep:
  """How the learning rate sweeps and when to stop (checked on construction).

  Attributes:
    start_lr, end_lr: the first and last learning rates; step ``t`` uses
      ``start_lr * (end_lr / start_lr) ** (t / (num_steps - 1))``.
    num_steps: optimizer steps when the sweep does not diverge.
    beta: smoothing of the loss (0: none).
    diverge_factor: stop once the smoothed loss exceeds this multiple of its minimum.
  """
  start_lr: float = 1e-7
  end_lr: float = 10.0
  num_steps: int = 100
  beta: float = 0.98
  diverge_factor: float = 4.0

  def __post_init__(self):
    if not 0.0 < self.start_lr < self.end_lr < math.inf:
      raise UserError(f"start_lr={self.start_lr}, end_lr={self.end_lr}; expected "
                      "0 < start_lr < end_lr")
    if isinstance(self.num_steps, bool) or not isinstance(self.num_steps, int) or self.num_steps < 3:
      raise UserError(f"num_steps={self.num_steps!r}; expected an integer >= 3")
    if not 0.0 <= self.beta < 1.0:
      raise UserError(f"beta={self.beta}; expected a smoothing factor in [0, 1)")
    if not self.diverge_factor > 1.0:
      raise UserError(f"diverge_factor={self.diverge_factor}; expected a number > 1")

  @property
  def lrs(self) -> np.ndarray:
    """``[num_steps]`` the learning rate of each step."""
    steps = np.arange(self.num_steps)
    return self.start_lr * (self.end_lr / self.start_lr) ** (steps / (self.num_steps - 1))

  @property
  def schedule(self) -> optax.Schedule:
    """The same learning rates as an optax schedule of the optimizer's step count."""
    return optax.exponential_decay(self.start_lr, self.num_steps - 1, self.end_lr / self.start_lr)


def _fresh_state(runner: steps.Runner, state: steps.TrainState,
                 tx: optax.GradientTransformation) -> steps.TrainState:
  """A copy of ``state``'s weights, statistics and rng in new buffers, with a new
  optimizer ``tx`` at step 0, placed on ``runner``'s mesh."""
  state = runner.put_state(state)  # may alias the caller's buffers: copied next
  params, batch_stats, rng, ema = jax.tree.map(
      jnp.copy, (state.params, state.batch_stats, state.rng, state.ema))
  fresh = state.replace(step=0, params=params, tx=tx, opt_state=steps.init_opt_state(tx, params),
                        batch_stats=batch_stats, rng=rng, ema=ema)
  return runner.put_state(fresh)


def lr_sweep(runner: steps.Runner, state: steps.TrainState, batches: Iterable[dict[str, np.ndarray]],
             make_tx: Callable[[optax.Schedule], optax.GradientTransformation],
             sweep: Sweep = Sweep()) -> LRCurve:
  """Runs the range test on a copy of ``state``; ``state`` itself is left untouched.

  Args:
    runner: supplies the compiled ``train_step`` (``(state, batch) -> (state, sums)`` with
      ``sums['loss']`` summed over the batch and ``sums['count']``) and the mesh.
    state: the weights to start from.
    batches: host batches (``image`` ``[B, H, W, C]``, ``label`` ``[B]``); at least
      ``sweep.num_steps`` of them unless the sweep diverges first.
    make_tx: builds the optimizer from a schedule, e.g. ``partial(optim.make_optimizer, cfg)``.
    sweep: the learning rates and the stopping rule.
  Returns:
    The curve up to and including the step where it diverged, and its suggestions.
  """
  sweep_state = _fresh_state(runner, state, make_tx(sweep.schedule))
  losses, best, diverged = [], math.inf, False
  bar = progress.Progress(sweep.num_steps, "LR finder")
  for batch in itertools.islice(batches, sweep.num_steps):
    sweep_state, sums = runner.train_step(sweep_state, runner.to_global(batch))
    losses.append(float(sums["loss"]) / int(sums["count"]))
    last = smooth(np.asarray(losses), sweep.beta)[-1]
    bar.update(1, lr=f"{sweep.lrs[len(losses) - 1]:.2e}", loss=f"{last:.4f}")
    if not math.isfinite(last) or last > sweep.diverge_factor * best:
      diverged = True
      break
    best = min(best, last)
  bar.close()
  if len(losses) < 2:
    raise UserError(f"the sweep took {len(losses)} step(s); expected at least 2 batches and "
                    f"a loss that does not diverge at start_lr={sweep.start_lr}")
  lrs, losses = sweep.lrs[:len(losses)], np.asarray(losses)
  smoothed = smooth(losses, sweep.beta)
  return LRCurve(lrs, losses, smoothed, diverged, *suggest(lrs, smoothed))


def sweep_batches(data: pipeline.Arrays, batch_size: int, seed: int,
                  augment: pipeline.BatchAugment | None) -> Iterator[dict[str, np.ndarray]]:
  """A run's training batches (shuffled, augmented), epoch after epoch."""
  for epoch in itertools.count():
    batches = pipeline.train_epoch(data, batch_size, seed, epoch, augment)
    yield from (batches[k] for k in range(len(batches)))


def find_lr(config: ml_collections.ConfigDict, run: assemble.Run | None = None,
            sweep: Sweep = Sweep()) -> LRCurve:
  """The range test of the run ``config`` describes: its data, model, initial weights,
  batch size, augmentation and optimizer (its learning rate replaced by the sweep).

  Args:
    config: a run config (``experiments/configs/*.py``).
    run: the run's ``assemble.build(config)`` if already built (its state is not modified).
    sweep: the learning rates and the stopping rule.
  Returns:
    The curve; reproducible for ``config.seed``.
  """
  run = run if run is not None else assemble.build(config)
  batches = sweep_batches(run.train, config.batch_size, config.seed, run.augment)
  return lr_sweep(run.runner, run.state, batches,
                  functools.partial(optim.make_optimizer, config.optimizer), sweep)
