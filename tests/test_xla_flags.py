"""``import cnnjax`` sets its XLA:CPU defaults unless the user set the flag or opted out."""
import os
import subprocess
import sys

import pytest

YNN = "--xla_cpu_experimental_ynn_fusion_type"


def _flags_after_import(**env: str) -> str:
  """``XLA_FLAGS`` as a fresh interpreter sees it after ``import cnnjax``, with ``env``."""
  base = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "CNNJAX_XLA_DEFAULTS")}
  code = "import os, cnnjax; print(os.environ.get('XLA_FLAGS', '<unset>'))"
  out = subprocess.run([sys.executable, "-c", code], env={**base, **env}, capture_output=True,
                       text=True, check=True)
  return out.stdout.strip()


@pytest.mark.parametrize("env, expected", [
    ({}, f"{YNN}="),
    ({"XLA_FLAGS": "--xla_force_host_platform_device_count=8"},
     f"--xla_force_host_platform_device_count=8 {YNN}="),
    ({"XLA_FLAGS": f"{YNN}=+LIBRARY_FUSION_TYPE_REDUCE"}, f"{YNN}=+LIBRARY_FUSION_TYPE_REDUCE"),
    ({"CNNJAX_XLA_DEFAULTS": "0"}, "<unset>"),
    ({"CNNJAX_XLA_DEFAULTS": "0", "XLA_FLAGS": "--xla_cpu_use_xnnpack=false"},
     "--xla_cpu_use_xnnpack=false"),
])
def test_import_sets_defaults_only_where_the_user_did_not(env, expected):
  assert _flags_after_import(**env) == expected
