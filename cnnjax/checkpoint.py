"""Orbax checkpoints of a run: the latest and the best (by validation loss) kept together.

The data pipeline needs no state of its own: batch ``k`` of epoch ``e`` is a function of
the seed (``cnnjax.data.pipeline.train_epoch``), so the restored ``step`` alone resumes
the exact batch sequence.
"""
import pathlib
from typing import Any

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

from cnnjax.errors import UserError

BEST_METRIC = "val_loss"


class Checkpoints:
  """Saves and restores train states under ``directory`` (async writes).

  Keeps the newest checkpoint and the one with the lowest ``val_loss``: a preservation
  policy of LatestN(1) or BestN(1), so a newest checkpoint with a worse metric is never
  deleted (``max_to_keep`` + ``best_fn`` would delete it).
  """

  def __init__(self, directory: str | pathlib.Path):
    policy = pp.AnyPreservationPolicy([
        pp.LatestN(n=1),
        pp.BestN(get_metric_fn=lambda m: m[BEST_METRIC], reverse=True, n=1),
    ])
    options = ocp.CheckpointManagerOptions(preservation_policy=policy,
                                           enable_async_checkpointing=True, create=True)
    self.directory = pathlib.Path(directory).absolute()
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def best_step(self) -> int | None:
    """The step with the lowest saved ``val_loss`` (the latest if none has a metric)."""
    return self._manager.best_step() or self._manager.latest_step()

  def save(self, step: int, state: Any, metrics: dict[str, float] | None = None) -> None:
    """Starts writing ``state`` as ``step``; returns before the write finishes."""
    self._manager.save(step, args=ocp.args.StandardSave(state), metrics=metrics)

  def restore(self, step: int, target: Any) -> Any:
    """Restores ``step`` into the structure, shapes and shardings of ``target``.

    ``target`` may be concrete or abstract (``jax.ShapeDtypeStruct`` leaves with
    shardings), so a checkpoint written on N devices restores onto this mesh.
    """
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    try:
      return self._manager.restore(step, args=ocp.args.StandardRestore(abstract))
    except (ValueError, KeyError, TypeError) as e:
      first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
      raise UserError(f"checkpoint {self.directory}/{step} does not match this model/optimizer "
                      f"({first[:300]}); use a new --workdir or the config it was written with") from e

  def wait(self) -> None:
    """Blocks until pending async writes are on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()
