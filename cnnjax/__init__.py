"""cnnjax: convolutional networks in JAX/Flax.

Importing cnnjax sets XLA:CPU defaults measured to be faster on CPU (see BENCHMARKS.md)
unless the user has set their own ``XLA_FLAGS`` entry for the same flag, or set
``CNNJAX_XLA_DEFAULTS=0`` to keep XLA's own defaults (e.g. to benchmark against them). This
must run before JAX initialises its backend, so import cnnjax before running any JAX
computation.
"""
import os as _os

_CPU_FLAGS = {
    # Eigen convolutions instead of YNNPACK's fusions: +10-50% on CPU (issue 10 measurements).
    "--xla_cpu_experimental_ynn_fusion_type": "",
}


def _set_default_xla_flags() -> None:
  if _os.environ.get("CNNJAX_XLA_DEFAULTS", "1") == "0":
    return
  flags = _os.environ.get("XLA_FLAGS", "")
  for name, value in _CPU_FLAGS.items():
    if name not in flags:
      flags = f"{flags} {name}={value}".strip()
  _os.environ["XLA_FLAGS"] = flags


_set_default_xla_flags()

from cnnjax.errors import UserError  # noqa: E402


def __getattr__(name: str):
  """``cnnjax.Learner`` without importing JAX and flax at ``import cnnjax`` time."""
  if name in ("Learner", "History"):
    from cnnjax import learner
    return getattr(learner, name)
  raise AttributeError(f"module 'cnnjax' has no attribute {name!r}")


__version__ = "0.1.0"
__all__ = ["Learner", "History", "UserError", "__version__"]
