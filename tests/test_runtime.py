"""cnnjax.runtime and experiments.entry's process setup: XLA:CPU flags and glibc's malloc
tunables are applied by the commands, never by an import."""
import os
import subprocess
import sys

import pytest

from cnnjax import runtime
from experiments import entry

YNN = "--xla_cpu_experimental_ynn_fusion_type"


@pytest.mark.parametrize("env, expected", [
    ({}, f"{YNN}="),
    ({"XLA_FLAGS": "--xla_force_host_platform_device_count=8"},
     f"--xla_force_host_platform_device_count=8 {YNN}="),
    ({"XLA_FLAGS": f"{YNN}=+LIBRARY_FUSION_TYPE_REDUCE"}, f"{YNN}=+LIBRARY_FUSION_TYPE_REDUCE"),
    ({"CNNJAX_XLA_DEFAULTS": "0"}, ""),
    ({"CNNJAX_XLA_DEFAULTS": "0", "XLA_FLAGS": "--xla_cpu_use_xnnpack=false"},
     "--xla_cpu_use_xnnpack=false"),
])
def test_xla_defaults_only_where_the_user_set_nothing(env, expected):
  assert runtime.xla_flags(env) == expected


TUNABLES = "glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=4294967295"


def test_the_tunables_are_added_to_the_users_own_and_never_override_them():
  assert runtime.malloc_tunables({}) == TUNABLES
  own = "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=0"
  assert (runtime.malloc_tunables({"GLIBC_TUNABLES": own})
          == f"{own}:glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=4294967295")
  assert runtime.malloc_tunables({"GLIBC_TUNABLES": TUNABLES}) is None
  assert runtime.malloc_tunables({"CNNJAX_MALLOC": "0"}) is None


@pytest.mark.slow
def test_importing_cnnjax_and_the_commands_changes_no_environment_variable():
  # jax itself sets TF_CPP_MIN_LOG_LEVEL and TPU_SKIP_MDS_QUERY; import it first.
  code = ("import os, importlib, jax, flax, optax, tensorflow_datasets\n"
          "before = dict(os.environ)\n"
          "import cnnjax, cnnjax.train, cnnjax.learner, cnnjax.interpret, cnnjax.transfer\n"
          "import experiments, experiments.entry, experiments.train\n"
          "print(sorted(k for k in set(before) | set(os.environ)"
          " if before.get(k) != os.environ.get(k)))\n")
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "GLIBC_TUNABLES")}
  done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                        check=True)
  assert done.stdout.strip() == "[]"


def _prepare(monkeypatch, argv, **env):
  """``entry.prepare_process`` as a process started by ``argv`` would run it; returns the
  arguments it restarts with (None: no restart) and its ``XLA_FLAGS``."""
  for name in ("XLA_FLAGS", "GLIBC_TUNABLES", "CNNJAX_MALLOC", "CNNJAX_XLA_DEFAULTS"):
    monkeypatch.delenv(name, raising=False)
  for name, value in env.items():
    monkeypatch.setenv(name, value)
  monkeypatch.setattr(sys, "orig_argv", argv)
  monkeypatch.setattr(runtime, "has_glibc", lambda: True)
  restarts = []
  monkeypatch.setattr(os, "execve", lambda path, args, environ: restarts.append(
      (args[1:], environ.get("GLIBC_TUNABLES"))))
  entry.prepare_process()
  return (restarts[0] if restarts else None), os.environ.get("XLA_FLAGS")


def test_a_command_restarts_once_with_its_arguments_and_the_tunable(monkeypatch):
  command = [sys.executable, "-m", "experiments.train", "--flag=1", "x y"]
  assert _prepare(monkeypatch, command) == (
      (["-m", "experiments.train", "--flag=1", "x y"], TUNABLES), f"{YNN}=")
  # The restarted process has the tunables: no second restart.
  assert _prepare(monkeypatch, command, GLIBC_TUNABLES=TUNABLES)[0] is None
  assert _prepare(monkeypatch, command, CNNJAX_MALLOC="0")[0] is None
  # The benchmarks of steps too (they time what the commands run, in their own process);
  # those of whole commands start them from the user's environment.
  bench = [sys.executable, "-m", "benchmarks", "--mode=models"]
  assert _prepare(monkeypatch, bench)[0] == (["-m", "benchmarks", "--mode=models"], TUNABLES)
  assert _prepare(monkeypatch, [sys.executable, "-m", "benchmarks.startup"])[0] is None


def test_pytest_or_a_notebook_is_not_restarted(monkeypatch):
  assert _prepare(monkeypatch, [sys.executable, "-m", "pytest"])[0] is None
  assert _prepare(monkeypatch, [sys.executable, "-c", "pass"])[0] is None


def test_configure_caches_compiles_from_a_tenth_of_a_second_unless_the_user_says(monkeypatch,
                                                                                   tmp_path):
  # JAX's default threshold (1 s) would leave the evaluation step's compile out of the cache.
  import jax
  name = "jax_persistent_cache_min_compile_time_secs"
  before, directory = getattr(jax.config, name), jax.config.jax_compilation_cache_dir
  size = jax.config.jax_compilation_cache_max_size
  monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path))  # a place of the user's
  try:
    monkeypatch.delenv(name.upper(), raising=False)
    jax.config.update(name, 1.0)
    runtime.configure()
    assert getattr(jax.config, name) == 0.1
    # The user's place and its size are left alone (a bound makes JAX keep access times).
    assert jax.config.jax_compilation_cache_dir == directory
    assert jax.config.jax_compilation_cache_max_size == size
    monkeypatch.setenv(name.upper(), "2")
    jax.config.update(name, 2.0)  # as JAX reads the variable
    runtime.configure()
    assert getattr(jax.config, name) == 2.0
  finally:
    jax.config.update(name, before)
