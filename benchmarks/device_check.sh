#!/usr/bin/env bash
# On a machine with an NVIDIA GPU (CUDA 12 or 13 driver): installs cnnjax with JAX's CUDA
# build in .venv-gpu, checks that JAX sees the GPU, runs the model and precision tests on it
# and the --models rows (float32 and bfloat16 columns, no PyTorch peers). About 5 minutes.
#
#   bash benchmarks/device_check.sh            # CUDA 12 driver
#   CUDA=cuda13 bash benchmarks/device_check.sh
#
# On GPU/TPU the models run XLA's kernels (cnnjax.onednn is CPU only) and config.precision
# 'auto' computes in bfloat16.
set -euo pipefail
cd "$(dirname "$0")/.."
CUDA="${CUDA:-cuda12}"
python3 -m venv .venv-gpu
# shellcheck disable=SC1091
source .venv-gpu/bin/activate
python -m pip install -q --upgrade pip
jax_version="$(python -c 'import re, pathlib; print(re.search(r"\"jax>=([0-9.]+)", pathlib.Path("pyproject.toml").read_text()).group(1))')"
pip install -q -e ".[dev]" "jax[${CUDA}]~=${jax_version}"
python - <<'PY'
import jax
from cnnjax import runtime
devices = jax.devices()
print("devices:", devices)
assert devices[0].platform == "gpu", f"no GPU seen by JAX: {devices}"
print(runtime.compute_dtype("auto")[1])
PY
time python -m pytest -q -m "not slow" tests/test_models.py tests/test_resnet.py \
  tests/test_precision.py tests/test_ema.py tests/test_train.py
time python -m benchmarks --mode=models --no_torch --windows 3 --window_seconds 2 \
  --warmup_seconds 2 --only seed_cnn,lenet,bn_cnn,resnet18_cifar,resnet18_frozen,lite0_frozen
