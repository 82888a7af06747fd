"""Orbax checkpoints of a run: the two latest and the best (by validation loss) kept together.

The data pipeline needs no iterator state of its own: batch ``k`` of epoch ``e`` is a
function of the seed (``cnnjax.data.pipeline.train_epoch``), so the ``step`` saved in the
train state *is* the iterator state, and restoring it resumes the exact batch sequence.

Every process of a multi-host run makes the same calls (orbax coordinates the writes);
restores go straight into this run's mesh, whatever the device count that wrote them.

A damaged checkpoint (a truncated or scrambled file, a lost manifest) is skipped for the
newest intact one (``restore_intact``); a full disk ends in a UserError with the earlier
checkpoints intact, and the half-written temporary directory is removed on the next start.
"""
import json
import pathlib
from typing import Any, Sequence

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

from cnnjax import workdir as workdir_lib
from cnnjax.errors import UserError

BEST_METRIC = "val_loss"


def _metric(metrics: dict[str, float]) -> float:
  return metrics[BEST_METRIC]


class Checkpoints:
  """Saves and restores train states under ``directory`` (async writes).

  Keeps the two newest checkpoints (one to fall back on if the newest is damaged) and the
  one with the lowest ``val_loss``: a preservation policy of LatestN(2) or BestN(1), so a
  newest checkpoint with a worse metric is never deleted (``max_to_keep`` + ``best_fn``
  would delete it). A checkpoint saved without a metric (a run stopped mid-epoch) is kept
  while it is one of the two newest.
  """

  def __init__(self, directory: str | pathlib.Path):
    policy = pp.AnyPreservationPolicy([
        pp.LatestN(n=2),
        pp.BestN(get_metric_fn=_metric, reverse=True, n=1, keep_checkpoints_without_metrics=False),
    ])
    # best_fn too: without it orbax neither writes the metrics nor answers best_step().
    options = ocp.CheckpointManagerOptions(preservation_policy=policy, best_fn=_metric,
                                           best_mode="min", enable_async_checkpointing=True,
                                           create=True, cleanup_tmp_directories=True)
    self.directory = pathlib.Path(directory).absolute()
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def best_step(self) -> int | None:
    """The step with the lowest saved ``val_loss`` (the latest if none has a metric)."""
    return self._manager.best_step() or self._manager.latest_step()

  def save(self, step: int, state: Any, metrics: dict[str, float] | None = None) -> None:
    """Starts writing ``state`` as ``step``; returns before the write finishes."""
    try:
      self._manager.save(step, args=ocp.args.StandardSave(state), metrics=metrics)
    except Exception as e:  # the previous save's error surfaces here
      self._raise_if_disk_full(e)
      raise

  def restore(self, step: int, target: Any, sharding: jax.sharding.Sharding | None = None) -> Any:
    """Restores ``step`` into the structure and shapes of ``target``, each array with
    ``sharding`` if given (e.g. ``parallel.replicated(mesh)``), else with its own in ``target``.

    ``target`` may be concrete or abstract (``jax.ShapeDtypeStruct`` leaves, e.g. from
    ``jax.eval_shape``): a checkpoint written on any number of devices or processes
    restores straight onto this mesh, with no copy on a single device first.
    """
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    if sharding is not None:  # arrays only: Python scalars (a fresh state's step) stay
      abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding)
                              if isinstance(a, jax.ShapeDtypeStruct) else a, abstract)
    try:
      return self._manager.restore(step, args=ocp.args.StandardRestore(abstract))
    except Exception as e:
      if _damaged(e):
        raise UserError(f"checkpoint {self.directory}/{step} cannot be read "
                        f"({_first_line(e)})") from e
      if isinstance(e, (ValueError, KeyError, TypeError)):
        raise UserError(f"checkpoint {self.directory}/{step} does not match this model/optimizer "
                        f"({_first_line(e)}); use a new --workdir or the config it was written "
                        "with") from e
      raise

  def restore_intact(self, target: Any, sharding: jax.sharding.Sharding | None = None,
                     prefer: int | None = None, set_aside: bool = False
                     ) -> tuple[int | None, Any, list[str]]:
    """``(step, state, skipped)``: ``prefer`` (default: the latest) restored as ``restore``
    does, or if it cannot be read the newest checkpoint that can; ``skipped`` says in one
    line each which could not and why. ``set_aside``: those move to
    ``<directory>/../corrupt_checkpoints/<step>`` (so a resumed run can save that step again;
    nothing is deleted). ``(None, target, [])`` when there is no checkpoint; a UserError
    when none can be read."""
    newest_first = sorted(self._manager.all_steps(), reverse=True)
    order = ([prefer] if prefer is not None else []) + [s for s in newest_first if s != prefer]
    skipped = []
    for step in order:
      try:
        state = self.restore(step, target, sharding)
      except UserError as e:
        skipped.append(str(e))
        continue
      if set_aside and skipped:
        self._set_aside(order[:len(skipped)])
      return step, state, skipped
    if not skipped:
      return None, target, []
    if "cannot be read" not in skipped[0]:
      raise UserError(skipped[0])
    raise UserError(f"{skipped[0]}; no intact checkpoint to fall back on; expected a new "
                    "--workdir or --new_run")

  def restore_saved(self, step: int) -> dict[str, Any]:
    """The saved tree of ``step`` as nested dicts of arrays, with no target: e.g. the
    params of another run whose optimizer state has another structure."""
    return self._manager.restore(step, args=ocp.args.StandardRestore())

  def wait(self) -> None:
    """Blocks until pending async writes are on disk."""
    try:
      self._manager.wait_until_finished()
    except Exception as e:
      self._raise_if_disk_full(e)
      raise

  def _raise_if_disk_full(self, e: BaseException) -> None:
    if workdir_lib.is_disk_full(e):
      raise UserError(f"no space left on the device of {self.directory}: a checkpoint could not "
                      "be written, the earlier checkpoints are intact; free space and run again "
                      "to resume") from e

  def _set_aside(self, bad: Sequence[int]) -> None:
    target = self.directory.parent / "corrupt_checkpoints"
    target.mkdir(exist_ok=True)
    for step in bad:
      n, name = 1, str(step)
      while (target / name).exists():
        n, name = n + 1, f"{step}.{n + 1}"
      (self.directory / str(step)).rename(target / name)
    self._manager.reload()

  def close(self) -> None:
    self._manager.close()


def _damaged(e: BaseException) -> bool:
  """Whether a restore failed on a damaged file (tensorstore's read errors, a truncated
  JSON) rather than on a state of another structure."""
  text = str(e)
  return isinstance(e, json.JSONDecodeError) or type(e) is Exception or any(
      mark in text for mark in ("NOT_FOUND", "OUT_OF_RANGE", "DATA_LOSS", "Error reading",
                                "Encountered error while reading"))


def _first_line(e: BaseException) -> str:
  lines = str(e).strip().splitlines()
  line = lines[0].split(" See full TensorStore")[0] if lines else type(e).__name__
  return line if len(line) <= 160 else line[:157] + "..."
