"""Data parallelism over a device mesh: batches sharded on the ``data`` axis, state replicated.

One path for 1 to N devices and 1 to M processes: ``jax.jit`` with explicit shardings,
so batch-norm statistics are those of the global batch with no axis names in the model.

With several processes (hosts), each one runs the same program on its own devices:
``initialize_distributed`` connects them first, each reads only its slice of every
global batch (``process_shard``) and ``to_global`` assembles the slices into one array.
"""
import os
from typing import Mapping, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from cnnjax.errors import UserError


def make_mesh(devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
  """A 1-D mesh with the axis called ``data``, over ``devices`` (default: every device
  of every process).

  Devices are ordered by process, so the global batch is the concatenation of the
  processes' slices in process order (what ``process_shard`` and the data pipeline
  assume; ``jax.make_mesh`` may order them by physical topology instead). The axis is of
  type Auto (jax 0.10's default is Explicit): the models stay free of sharding
  annotations and XLA propagates the batch sharding through them.
  """
  devices = sorted(jax.devices() if devices is None else devices,
                   key=lambda d: (d.process_index, d.id))
  return jax.sharding.Mesh(np.array(devices), ("data",), axis_types=(jax.sharding.AxisType.Auto,))


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


def any_process(flag: bool) -> bool:
  """``flag`` OR-ed over all processes, so every process gets the same answer.

  With several processes this is a collective: every process must call it at the same
  point of the program. With one it returns ``flag`` at no cost.
  """
  if jax.process_count() == 1:
    return flag
  return bool(multihost_utils.process_allgather(np.asarray(flag)).any())


def barrier(name: str) -> None:
  """Waits until every process reaches ``barrier(name)``; nothing with one process."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def cluster_environment(environ: Mapping[str, str] = os.environ) -> str | None:
  """The multi-process launcher ``environ`` shows, if any, by name; None for a single process.

  These are the environments in which ``jax.distributed.initialize()`` finds the
  coordinator, the process count and this process's id by itself. Cloud TPU VM pod slices
  announce themselves only through their metadata server: pass ``--distributed`` there.
  """
  def count(name: str) -> int:
    return int(environ.get(name, "1") or "1")

  if environ.get("JAX_COORDINATOR_ADDRESS"):
    return "JAX_COORDINATOR_ADDRESS"
  if "SLURM_STEP_NODELIST" in environ and count("SLURM_NTASKS") > 1:  # inside a multi-task srun
    return "SLURM"
  if "OMPI_MCA_orte_hnp_uri" in environ and count("OMPI_COMM_WORLD_SIZE") > 1:
    return "Open MPI"
  if "," in environ.get("TPU_PROCESS_ADDRESSES", environ.get("TPU_WORKER_HOSTNAMES", "")):
    return "TPU slice"  # a multi-host TPU slice on GKE
  if environ.get("MEGASCALE_COORDINATOR_ADDRESS"):
    return "TPU multislice"
  return None


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None, force: bool | None = None) -> bool:
  """Connects the processes of a multi-host run; must run before any JAX computation.

  Calls ``jax.distributed.initialize`` with the arguments given (JAX detects the others
  from SLURM, Open MPI or a TPU slice) when any argument is given, when ``force`` is
  True, or when ``cluster_environment()`` finds a multi-process launcher; a single
  process with nothing given is left alone; ``force=False`` never initialises.
  Across CPU processes the collectives go over TCP (gloo, JAX's default).

  Returns:
    Whether the distributed system was initialised.
  Raises:
    UserError: the arguments are incomplete or inconsistent.
  """
  explicit = (coordinator_address, num_processes, process_id) != (None, None, None)
  if force is False and explicit:
    raise UserError("--nodistributed contradicts --coordinator_address/--num_processes/"
                    "--process_id; drop one or the other")
  if force is False or not (explicit or force or cluster_environment()):
    return False
  try:
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
  except (ValueError, TypeError) as e:
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise UserError(f"cannot start a multi-process run: {first} (expected --coordinator_address="
                    "HOST:PORT --num_processes=N --process_id=I, or a SLURM, Open MPI or TPU "
                    "launcher)") from e
  return True
