"""Data parallelism over a device mesh: batches sharded on the ``data`` axis, state replicated.

One path for 1 to N devices and 1 to M processes: ``jax.jit`` with explicit shardings,
so batch-norm statistics are those of the global batch with no axis names in the model.
"""
import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from cnnjax.errors import UserError


def make_mesh() -> jax.sharding.Mesh:
  """A 1-D mesh over every device of every process, with the axis called ``data``.

  The axis is of type Auto (jax 0.10's default is Explicit): the models stay free of
  sharding annotations and XLA propagates the batch sharding through them.
  """
  return jax.make_mesh((jax.device_count(),), ("data",), axis_types=(jax.sharding.AxisType.Auto,))


def data_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  """Leading (batch) axis split over ``data``; other axes whole."""
  return NamedSharding(mesh, P("data"))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
  """The same full copy on every device."""
  return NamedSharding(mesh, P())


def check_batch_size(batch_size: int, mesh: jax.sharding.Mesh, what: str = "batch_size") -> None:
  """Raises a UserError unless the global ``batch_size`` splits evenly over the devices."""
  if batch_size % mesh.size:
    raise UserError(f"{what}={batch_size} does not divide by the {mesh.size} devices; "
                    f"use a multiple of {mesh.size}")


def process_shard() -> tuple[int, int]:
  """``(index, count)`` of this process: which slice of each global batch it reads."""
  return jax.process_index(), jax.process_count()


def to_global(batch: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
  """Assembles this process's slice of a batch into global arrays sharded on ``data``."""
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}
