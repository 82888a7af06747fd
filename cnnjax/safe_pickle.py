"""Unpickling of files a user hands us, restricted to the globals their format holds.

``pickle.load`` runs any callable a file names; a crafted archive or ``.pth`` would run
arbitrary code. ``load`` resolves only the ``(module, name)`` pairs in ``allowed`` and
refuses every other global with a ``UserError`` naming it (the rule of
``torch.load(weights_only=True)``).
"""
import pickle
from collections.abc import Callable, Mapping
from typing import Any, BinaryIO

from cnnjax.errors import UserError


class _Restricted(pickle.Unpickler):

  def __init__(self, file: BinaryIO, allowed: Mapping[tuple[str, str], Any], source: str,
               persistent_load: Callable[[Any], Any] | None, **kwargs):
    super().__init__(file, **kwargs)
    self._allowed, self._source = allowed, source
    if persistent_load is not None:
      self.persistent_load = persistent_load

  def find_class(self, module: str, name: str) -> Any:
    try:
      return self._allowed[(module, name)]
    except KeyError:
      raise UserError(f"{self._source} asks to load {module}.{name}, which its format does not "
                      "hold; refused (expected only arrays and plain containers)") from None


def load(file: BinaryIO, allowed: Mapping[tuple[str, str], Any], source: str, *,
         persistent_load: Callable[[Any], Any] | None = None, encoding: str = "ASCII") -> Any:
  """The object pickled in ``file``, resolving only the globals in ``allowed``.

  Args:
    file: a binary file positioned at the pickle.
    allowed: ``(module, name) -> object`` for each global the format may name.
    source: how to name the file in errors (e.g. its path).
    persistent_load: resolves persistent ids (torch's zip format names its storages so).
    encoding: as ``pickle.load``'s (``'bytes'`` for Python 2 pickles such as CIFAR's).
  """
  try:
    return _Restricted(file, allowed, source, persistent_load, encoding=encoding).load()
  except UserError:
    raise
  except Exception as e:  # noqa: BLE001 - any parse failure is a bad file
    raise UserError(f"cannot read {source}: {type(e).__name__}: {e}"[:300]) from e
