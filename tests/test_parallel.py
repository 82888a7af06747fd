"""Data parallelism: the 8-device step equals the 1-device step (batch norm included), the
experiments use every device with no flag, and multi-process start-up follows the flags
and the launcher's environment."""
import jax
import pytest

from cnnjax import parallel
from cnnjax.errors import UserError
from tests import scaleout
from tests.scaleout import end_runs, xla_cache  # noqa: F401  (fixtures)

pytestmark = [pytest.mark.usefixtures("end_runs"), pytest.mark.slow]  # subprocesses

LAUNCHER_VARS = ["JAX_COORDINATOR_ADDRESS", "SLURM_STEP_NODELIST", "SLURM_NTASKS",
                 "OMPI_MCA_orte_hnp_uri", "OMPI_COMM_WORLD_SIZE", "TPU_PROCESS_ADDRESSES",
                 "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS"]


@pytest.fixture(scope="module")
def parity(tmp_path_factory, xla_cache):
  out = tmp_path_factory.mktemp("parity") / "parity.npz"
  scaleout.run(out.with_suffix(""), ["parity", str(out)], scaleout.env(xla_cache, devices=8))
  return scaleout.load(out)


def test_8_devices_split_the_batch_and_replicate_the_state(parity):
  assert parity["all/devices"] == 8 and parity["all/shard_rows"] == 4  # 32 rows, 4 per device
  assert parity["all/state_devices"] == 8
  assert parity["one/devices"] == 1 and parity["one/shard_rows"] == 32


def test_8_device_steps_equal_1_device_steps_with_batch_norm(parity):
  names = {k.split("/", 1)[1] for k in parity if k.startswith("all/")}
  trained = {k for k in names if k.startswith(("params/", "batch_stats/"))}
  assert any(k.startswith("batch_stats/") and k.endswith("/var") for k in trained)
  scaleout.assert_trees_close({k: parity[f"all/{k}"] for k in trained},
                              {k: parity[f"one/{k}"] for k in trained}, trained, tol=1e-4)
  assert float(parity["all/loss"]) == pytest.approx(float(parity["one/loss"]), rel=1e-5)
  assert parity["one/moved"] > 1e-2  # the steps changed the params far beyond the tolerance


def test_experiment_uses_all_8_devices_with_no_flag(tmp_path, npz_path, xla_cache):
  args = ["cli", "--config", "experiments/configs/runlocal.py", "--workdir", str(tmp_path / "run"),
          f"--config.data.source={npz_path}"]
  scaleout.run(tmp_path / "run8", args,
               scaleout.env(xla_cache, devices=8, CNNJAX_TEST_DUMP=str(tmp_path)))
  dump = scaleout.load(tmp_path / "process0.npz")
  assert dump["mesh_size"] == 8 and dump["process_count"] == 1
  assert dump["step"] == 18  # 154 training images // 16 = 9 steps, 2 epochs
  assert (tmp_path / "run/test_metrics.json").exists()


def test_batch_not_divisible_by_the_devices_is_one_line_error(tmp_path, npz_path, xla_cache):
  args = ["cli", "--config", "experiments/configs/runlocal.py", "--workdir", str(tmp_path / "run"),
          f"--config.data.source={npz_path}", "--config.batch_size=12"]
  r = scaleout.Run(tmp_path / "run", args,
                   scaleout.env(xla_cache, devices=8, CNNJAX_TEST_DUMP=str(tmp_path)))
  assert r.wait() == 2, r.stderr
  assert r.stderr.strip().splitlines() == [
      "error: batch_size=12 does not divide by the 8 devices; use a multiple of 8"]


@pytest.mark.parametrize("environ, expected", [
    ({}, None),
    ({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"}, "JAX_COORDINATOR_ADDRESS"),
    ({"SLURM_STEP_NODELIST": "node[1-2]", "SLURM_NTASKS": "8"}, "SLURM"),
    ({"SLURM_STEP_NODELIST": "node1", "SLURM_NTASKS": "1"}, None),  # one task: one process
    ({"SLURM_NTASKS": "8"}, None),  # an sbatch script outside srun
    ({"OMPI_MCA_orte_hnp_uri": "123.0;tcp://10.0.0.1:1", "OMPI_COMM_WORLD_SIZE": "4"}, "Open MPI"),
    ({"TPU_WORKER_HOSTNAMES": "t1,t2"}, "TPU slice"),
    ({"TPU_WORKER_HOSTNAMES": "localhost"}, None),  # a single-host TPU VM
    ({"MEGASCALE_COORDINATOR_ADDRESS": "10.0.0.1"}, "TPU multislice"),
])
def test_cluster_environment_finds_multi_process_launchers(environ, expected):
  assert parallel.cluster_environment(environ) == expected


@pytest.fixture
def initialize_calls(monkeypatch):
  """Records calls of jax.distributed.initialize (the real one must precede any JAX use)."""
  for name in LAUNCHER_VARS:
    monkeypatch.delenv(name, raising=False)
  calls = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda *args: calls.append(args))
  return calls


def test_a_single_process_with_no_flags_is_not_initialised(initialize_calls):
  assert parallel.initialize_distributed() is False
  assert initialize_calls == []


def test_flags_and_launchers_initialise(initialize_calls, monkeypatch):
  assert parallel.initialize_distributed("host0:1234", 2, 1) is True
  assert parallel.initialize_distributed(force=True) is True  # e.g. a Cloud TPU VM pod slice
  monkeypatch.setenv("SLURM_STEP_NODELIST", "node[1-2]")
  monkeypatch.setenv("SLURM_NTASKS", "2")
  assert parallel.initialize_distributed() is True
  assert parallel.initialize_distributed(force=False) is False
  assert initialize_calls == [("host0:1234", 2, 1), (None, None, None), (None, None, None)]


def test_bad_distributed_flags_are_one_line_errors(initialize_calls, monkeypatch):
  with pytest.raises(UserError, match="--nodistributed contradicts"):
    parallel.initialize_distributed(num_processes=2, force=False)

  def refuse(*args):
    raise ValueError("process_id and num_processes must be nonnegative, with process_id < "
                     "num_processes. Got process_id=2, num_processes=2.")
  monkeypatch.setattr(jax.distributed, "initialize", refuse)
  with pytest.raises(UserError) as e:
    parallel.initialize_distributed("host0:1234", 2, 2)
  assert "\n" not in str(e.value)
  assert str(e.value).startswith("cannot start a multi-process run: process_id and num_processes")

