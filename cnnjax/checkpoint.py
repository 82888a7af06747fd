"""Orbax checkpoints of a run: the latest and the best (by validation loss) kept together.

The data pipeline needs no iterator state of its own: batch ``k`` of epoch ``e`` is a
function of the seed (``cnnjax.data.pipeline.train_epoch``), so the ``step`` saved in the
train state *is* the iterator state, and restoring it resumes the exact batch sequence.

Every process of a multi-host run makes the same calls (orbax coordinates the writes);
restores go straight into this run's mesh, whatever the device count that wrote them.
"""
import pathlib
from typing import Any

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

from cnnjax.errors import UserError

BEST_METRIC = "val_loss"


def _metric(metrics: dict[str, float]) -> float:
  return metrics[BEST_METRIC]


class Checkpoints:
  """Saves and restores train states under ``directory`` (async writes).

  Keeps the newest checkpoint and the one with the lowest ``val_loss``: a preservation
  policy of LatestN(1) or BestN(1), so a newest checkpoint with a worse metric is never
  deleted (``max_to_keep`` + ``best_fn`` would delete it). A checkpoint saved without a
  metric (a run stopped mid-epoch) is kept while it is the newest.
  """

  def __init__(self, directory: str | pathlib.Path):
    policy = pp.AnyPreservationPolicy([
        pp.LatestN(n=1),
        pp.BestN(get_metric_fn=_metric, reverse=True, n=1, keep_checkpoints_without_metrics=False),
    ])
    # best_fn too: without it orbax neither writes the metrics nor answers best_step().
    options = ocp.CheckpointManagerOptions(preservation_policy=policy, best_fn=_metric,
                                           best_mode="min", enable_async_checkpointing=True,
                                           create=True)
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
    except (ValueError, KeyError, TypeError) as e:
      first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
      raise UserError(f"checkpoint {self.directory}/{step} does not match this model/optimizer "
                      f"({first[:300]}); use a new --workdir or the config it was written with") from e

  def restore_saved(self, step: int) -> dict[str, Any]:
    """The saved tree of ``step`` as nested dicts of arrays, with no target: e.g. the
    params of another run whose optimizer state has another structure."""
    return self._manager.restore(step, args=ocp.args.StandardRestore())

  def wait(self) -> None:
    """Blocks until pending async writes are on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()
