"""The one training loop: ``fit`` (epochs, signals, checkpoints through a callback) and
``train_and_evaluate(config, workdir)``, a whole experiment: assemble the run
(``assemble.build``), find the learning rate first when ``schedule.peak_lr='auto'``, train,
checkpoint every epoch, test.

A workdir holds: ``config.json``, ``run_info.json`` (machine, versions, devices),
``metrics.jsonl`` and ``metrics.csv`` (one row per epoch), ``curves.png``,
``test_metrics.json``, ``confusion.png``, ``predictions.png``, TensorBoard event files
(``cnnjax.tensorboard``) and ``checkpoints/`` (the two latest and the best).
"""
import functools
import json
import pathlib
import signal
import time
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
import optax

from cnnjax import (assemble, evaluate, logs, lr_finder, optim, parallel, plots, progress, runtime,
                    steps, tensorboard)
from cnnjax import callbacks as callbacks_lib
from cnnjax import workdir as workdir_lib
from cnnjax.checkpoint import Checkpoints
from cnnjax.data import pipeline
from cnnjax.errors import UserError


class StopRequested:
  """Turns SIGTERM (preemption) and Ctrl-C into a flag the loop checks between steps,
  so the run saves a checkpoint and exits cleanly instead of dying mid-write."""

  def __init__(self):
    self.requested = False
    self._previous = {}

  def __enter__(self) -> "StopRequested":
    for sig in (signal.SIGTERM, signal.SIGINT):
      self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    del frame
    if self.requested:  # a second Ctrl-C: stop now
      raise KeyboardInterrupt
    self.requested = True
    print(f"\n{signal.Signals(signum).name}: saving a checkpoint, then stopping "
          "(run again with the same --workdir to resume)", flush=True)

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)

  def agreed(self) -> bool:
    """Whether any process was asked to stop, the same answer on all (a collective with
    several processes: SIGTERM reaches each at a different step, and a process that
    stopped alone would leave the others waiting in the next step's all-reduce)."""
    self.requested = parallel.any_process(self.requested)
    return self.requested


def fit(runner: steps.Runner, state: steps.TrainState, train_data: pipeline.Arrays,
        val_data: pipeline.Arrays, *, num_epochs: int, batch_size: int, eval_batch_size: int,
        seed: int, augment: pipeline.BatchAugment | None, schedule: optax.Schedule,
        callbacks: Sequence[callbacks_lib.Callback] = (), stop: "StopRequested | None" = None,
        log_every_steps: int = 10, workers: int = 0) -> steps.TrainState:
  """The epoch loop, from ``state.step`` (mid-epoch after a resume) to ``num_epochs``.

  Each epoch trains on ``pipeline.train_epoch(train_data, ..., seed, epoch)`` and evaluates
  on ``val_data`` (if any); ``callbacks`` (``cnnjax.callbacks``) see every
  ``log_every_steps``-th step and every epoch's metrics row, may end the loop after an
  epoch, and may replace the final state. Returns the final state, or the state at the
  step where ``stop`` was requested (check ``stop.requested``). ``workers`` > 0 prepares
  batches in that many grain worker processes (``pipeline.prefetch``) instead of a thread.
  """
  steps_per_epoch = len(train_data[0]) // batch_size
  shard = parallel.process_shard()
  first_step_start: float | None = time.time()  # None once the first step is reported
  rates = None  # every step's learning rate, for the logs (computed when first needed)

  def rate(step: int) -> float:
    nonlocal rates
    if rates is None:
      rates = optim.schedule_values(schedule, num_epochs * steps_per_epoch)
    return float(rates[step - 1])

  for epoch in range(int(state.step) // steps_per_epoch, num_epochs):
    first = int(state.step) - epoch * steps_per_epoch
    batches = pipeline.train_epoch(train_data, batch_size, seed, epoch, augment, shard)
    bar = progress.Progress(steps_per_epoch, f"Epoch {epoch + 1}/{num_epochs}", first)
    # The epoch's running sums, on the host: a step's sums are read (and added here) only at
    # the next log step, so the loop queues no device work of its own between steps.
    sums = {"loss": 0.0, "correct": 0, "count": 0}
    unread = []  # sums of the steps since the last log step
    start = time.time()
    stopped = False
    pending = None  # (step, sums of the steps up to it) of a log step, read once the next is queued

    def add(step_sums: list[dict[str, jax.Array]]) -> None:
      for values in jax.device_get(step_sums):  # waits for the last of them, not the queued one
        for name, value in values.items():
          sums[name] += value.item()

    def log(step: int, step_sums: list[dict[str, jax.Array]]) -> None:
      add(step_sums)
      loss = sums["loss"] / sums["count"]
      bar.update(log_every_steps, loss=f"{loss:.4f}")
      values = {"loss": loss, "accuracy": sums["correct"] / sums["count"], "lr": rate(step)}
      for callback in callbacks:
        callback.on_step_end(step, values)

    for k, batch in enumerate(pipeline.prefetch(batches[first:], workers=workers), start=first):
      state, step_sums = runner.train_step(state, runner.to_global(batch))
      if first_step_start is not None:  # once per fit: the compile (or the cache) included
        jax.block_until_ready(step_sums)
        logs.say(f"First step done in {time.time() - first_step_start:.1f}s "
                 "(compiling it included)")
        first_step_start = None
      if pending is not None:  # the device works on this step while the host logs
        log(*pending)
        pending = None
      unread.append(step_sums)
      if (k + 1) % log_every_steps == 0:
        pending, unread = (epoch * steps_per_epoch + k + 1, unread), []
      stopped = stop is not None and stop.agreed()
      if stopped:
        break
    if pending is not None:
      log(*pending)
    bar.close()
    if stopped:
      return state
    add(unread)
    row = {"epoch": epoch + 1, "step": int(state.step),
           "train_loss": sums["loss"] / sums["count"],
           "train_accuracy": sums["correct"] / sums["count"],
           "lr": rate(int(state.step))}
    if len(val_data[1]):
      val = runner.evaluate(state, val_data, eval_batch_size, "Validation")
      row.update(val_loss=val["loss"], val_accuracy=val["accuracy"])
    row["seconds"] = time.time() - start
    for callback in callbacks:
      callback.on_epoch_end(state, row)
    if any(callback.stop_training for callback in callbacks):
      break
  for callback in callbacks:
    state = callback.on_train_end(state) or state
  return state


def header(run: assemble.Run) -> list[str]:
  """What a run is about to do, before its first step: data, model, devices, batches."""
  c, d = run.config, run.data
  params = sum(x.size for x in jax.tree.leaves(run.state.params))
  mesh = run.runner.mesh
  precision = runtime.compute_dtype(c.precision)[1]
  if c.ema:
    restarts = f", training restarts from it every {c.lookahead} steps" if c.lookahead else ""
    precision += f" | evaluated on a moving average of the weights (decay {c.ema:g}{restarts})"
  return [f"Data: {c.data.source} | train {len(run.train[1])}, val {len(run.val[1])}, "
          f"test {len(d.test[1])} | {len(d.class_names)} classes | inputs {d.image_shape}",
          *([f"Data read from {run.images.origin}"] if run.images.origin else []),
          f"Model: {c.model.name} | {params:,} parameters",
          *run.notes,
          f"Devices: {mesh.size} x {mesh.devices.flat[0].platform} ({jax.process_count()} "
          f"process(es)) | batch {c.batch_size}, {run.steps_per_epoch} steps per epoch, "
          f"{c.num_epochs} epochs",
          precision]


def use_lr_finder(run: assemble.Run, workdir: pathlib.Path | None) -> assemble.Run:
  """The run with its schedule peaking at the LR finder's suggestion
  (``schedule.peak_lr='auto'``), found from its initial state (left untouched); the sweep's
  plot and curve go to ``workdir`` if given."""
  c = run.config
  if c.schedule.peak_lr != "auto":
    raise UserError(f"config.schedule.peak_lr={c.schedule.peak_lr!r}; expected 'auto' "
                    "(a fixed rate is config.optimizer.lr)")
  curve = lr_finder.find_lr(c, run)
  if workdir is not None and jax.process_index() == 0:
    curve.write(workdir)
  logs.say(f"{curve.summary()}: peak learning rate {curve.suggested:.3g} (valley)")
  return run.with_peak_lr(curve.suggested)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | pathlib.Path,
                       new_run: bool = False) -> dict[str, Any]:
  """Trains ``config.model`` on ``config.data``, checkpointing to ``workdir`` every epoch.

  The workdir is locked while the run writes there (``workdir.Lock``). Rerunning with the
  same workdir resumes from the newest intact checkpoint with the exact next batch, if the
  config is the run's (``workdir.compare``); a finished run is left as it is. ``new_run``:
  the run the workdir holds moves to ``workdir/previous/<n>/`` and a new one starts.

  Returns the test metrics (also in ``workdir/test_metrics.json``), or
  ``{'interrupted': True, 'step': ...}`` if a signal stopped the run.
  """
  workdir = workdir_lib.checked(workdir)
  if jax.process_index() != 0:  # process 0 holds the lock for all
    return _train_and_evaluate(config, workdir, new_run)
  with workdir_lib.Lock(workdir) as lock:
    if lock.taken_over:
      was = lock.taken_over
      logs.say(f"The run that held {workdir} stopped without ending (pid {was.get('pid')} on "
               f"{was.get('host')}, started {was.get('started')}); this run takes over")
    return _train_and_evaluate(config, workdir, new_run)


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: pathlib.Path,
                        new_run: bool) -> dict[str, Any]:
  is_main = jax.process_index() == 0
  holds_run = workdir_lib.holds_run(workdir)
  parallel.barrier("cnnjax-workdir-checked")  # before process 0 moves anything
  if holds_run and new_run:
    if is_main:
      logs.say(f"New run: the run {workdir} held is now in {workdir_lib.set_aside(workdir)}")
    parallel.barrier("cnnjax-workdir-set-aside")
  elif holds_run:
    changed = workdir_lib.compare(assemble.read_config(workdir), config)
    if changed:
      raise UserError(f"--workdir {workdir} holds a different run ({'; '.join(changed)}); "
                      "expected the same config to resume it, a new --workdir, or --new_run "
                      f"to move it to {workdir / workdir_lib.PREVIOUS}/ and start afresh")
    if (workdir / "test_metrics.json").exists():
      result = json.loads((workdir / "test_metrics.json").read_text())
      logs.say(f"{workdir} holds this run, finished: {evaluate.format_test(result)}; nothing "
               "to do (--new_run trains it again)")
      return result
  start = time.time()
  run = assemble.build(config, workdir)
  if is_main:
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.json.tmp").write_text(config.to_json(indent=2))
    (workdir / "config.json.tmp").replace(workdir / "config.json")  # others may be reading it
    (workdir / "run_info.json").write_text(json.dumps(logs.run_info(), indent=2))
  if config.schedule.peak_lr is not None:
    run = use_lr_finder(run, workdir)
  for line in header(run):
    logs.say(line)
  ckpt_dir = workdir / "checkpoints"
  checkpoints = Checkpoints(ckpt_dir)
  start_step, state, skipped = checkpoints.restore_intact(
      run.state, parallel.replicated(run.runner.mesh), set_aside=is_main)
  for line in skipped:
    logs.say(f"{line}: set aside in {workdir / 'corrupt_checkpoints'}")
  start_step = start_step or 0
  if start_step:
    logs.say(f"Resumed from {ckpt_dir}/{start_step} (epoch {start_step // run.steps_per_epoch + 1}, "
             f"batch {start_step % run.steps_per_epoch})")
  history = logs.read_history(workdir, start_step // run.steps_per_epoch)
  events = tensorboard.Events(workdir, start_step) if is_main else None
  logs.say(f"Ready to train in {time.time() - start:.1f}s (the first step compiles)")
  try:
    return _fit_and_test(config, workdir, run, state, checkpoints, events, history)
  finally:  # the events' last buffer also when the run fails (a course goes on to the next)
    if events is not None:
      events.close()


def _fit_and_test(config: ml_collections.ConfigDict, workdir: pathlib.Path,
                  run: assemble.Run, state: steps.TrainState, checkpoints: Checkpoints,
                  events: "tensorboard.Events | None",
                  history: list[dict[str, Any]]) -> dict[str, Any]:
  """``_train_and_evaluate`` from its first step on: fit, then the test and its pictures."""
  is_main = jax.process_index() == 0

  recorder = _Recorder(workdir, config.num_epochs, history, checkpoints, events, run.schedule,
                       run.total_steps)
  callbacks = [recorder]
  num_epochs = config.num_epochs
  if config.early_stopping.patience:
    e = config.early_stopping
    stopper = callbacks_lib.EarlyStopping(e.monitor, e.patience, e.min_delta, e.mode,
                                          history=history)
    callbacks.append(stopper)
    if stopper.stop_training:  # it stopped this run before, and the test did not follow
      num_epochs = len(history)

  with StopRequested() as stop:
    state = fit(run.runner, run.runner.put_state(state), run.train, run.val,
                num_epochs=num_epochs, batch_size=config.batch_size,
                eval_batch_size=config.eval_batch_size, seed=config.seed, augment=run.augment,
                schedule=run.schedule, callbacks=callbacks, stop=stop,
                log_every_steps=config.log_every_steps, workers=config.data.workers)
  if stop.agreed():
    checkpoints.save(int(state.step), state)
    checkpoints.wait()
    checkpoints.close()
    return {"interrupted": True, "step": int(state.step)}

  checkpoints.wait()
  if config.test_with == "best" and checkpoints.best_step() != int(state.step):
    state = run.runner.put_state(checkpoints.restore(checkpoints.best_step(), state))
  checkpoints.close()
  result, pred = evaluate.test_report(run, state)
  if is_main:
    (workdir / "test_metrics.json").write_text(json.dumps(result, indent=2))
    print(evaluate.format_test(result), flush=True)  # the result first, then its pictures
    evaluate.write_test_pictures(workdir, run.images, result, pred)
    step = int(state.step)
    events.scalars("test", {k: v for k, v in result.items()
                            if k == "test_loss" or k.startswith(("accuracy", "macro_"))}, step)
    for name in ("confusion", "predictions"):
      events.image(name, workdir / f"{name}.png", step)
  return result


class _Recorder(callbacks_lib.Callback):
  """What a run writes as it trains: a checkpoint every epoch (all processes), and on
  process 0 the epoch line, ``metrics.jsonl``/``.csv``, ``curves.png`` and TensorBoard."""

  def __init__(self, workdir: pathlib.Path, num_epochs: int, history: list[dict[str, Any]],
               checkpoints: Checkpoints, events: "tensorboard.Events | None",
               schedule: optax.Schedule, total_steps: int):
    self.workdir, self.num_epochs, self.history = workdir, num_epochs, history
    self.checkpoints, self.events = checkpoints, events
    self.schedule, self.total_steps = schedule, total_steps

  @functools.cached_property
  def step_lrs(self) -> np.ndarray:
    """``[total_steps]`` the rate of every step, computed once, after the first epoch (not
    before the first step): the curves show the schedule's shape."""
    return optim.schedule_values(self.schedule, self.total_steps)

  def on_step_end(self, step: int, values: dict[str, float]) -> None:
    if self.events is not None:
      self.events.scalars("train", values, step)

  def on_epoch_end(self, state: steps.TrainState, row: dict[str, Any]) -> None:
    self.history.append(row)
    self.checkpoints.save(row["step"], state, {"val_loss": row.get("val_loss", row["train_loss"])})
    if self.events is None:  # not process 0
      return
    print(format_epoch(row, self.num_epochs), flush=True)
    logs.write_history(self.history, self.workdir)
    plots.plot_curves(self.history, self.workdir / "curves.png", self.step_lrs[:row["step"]])
    step, events = row["step"], self.events
    if "val_loss" in row:
      events.scalars("val", {"loss": row["val_loss"], "accuracy": row["val_accuracy"]}, step)
    events.scalars("epoch", {k: row[k] for k in ("train_loss", "train_accuracy", "seconds")}, step)
    events.image("curves", self.workdir / "curves.png", step)
    events.flush()


def format_epoch(row: dict[str, Any], num_epochs: int) -> str:
  """``Epoch 3/10 | train_loss .. | train_acc .. | val_loss .. | val_acc .. | 41.2s``."""
  parts = [f"Epoch {row['epoch']}/{num_epochs}", f"train_loss {row['train_loss']:.4f}",
           f"train_acc {row['train_accuracy']:.4f}"]
  if "val_loss" in row:
    parts += [f"val_loss {row['val_loss']:.4f}", f"val_acc {row['val_accuracy']:.4f}"]
  return " | ".join(parts + [f"{row['seconds']:.1f}s"])
