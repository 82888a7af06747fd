"""cnnjax: convolutional networks in JAX/Flax.

Importing cnnjax changes nothing in the process (no environment variable, no restart): the
CPU settings are applied explicitly, see ``cnnjax.runtime``.
"""
import importlib

from cnnjax.errors import UserError


def __getattr__(name: str):
  """``cnnjax.Learner`` and ``cnnjax.callbacks`` without importing JAX and flax at ``import
  cnnjax`` time."""
  if name in ("Learner", "History"):
    from cnnjax import learner
    return getattr(learner, name)
  if name == "callbacks":  # a submodule: 'from cnnjax import callbacks' would come back here
    return importlib.import_module("cnnjax.callbacks")
  raise AttributeError(f"module 'cnnjax' has no attribute {name!r}")


__version__ = "0.1.0"
__all__ = ["Learner", "History", "UserError", "callbacks", "__version__"]
