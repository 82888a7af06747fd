"""Progress of long loops: a tqdm bar in a terminal or a notebook; in a log (stdout not a
terminal) one line at most every ``LOG_SECONDS``; nothing on processes other than 0."""
import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

import jax

T = TypeVar("T")
LOG_SECONDS = 30.0


def interactive() -> bool:
  """Whether stdout is a terminal or a Jupyter notebook."""
  return sys.stdout.isatty() or "ipykernel" in sys.modules


class Progress:
  """Progress over ``total`` items titled ``desc``, from ``initial``; ``update(n, **postfix)``
  after each chunk, ``close()`` at the end."""

  def __init__(self, total: int, desc: str, initial: int = 0):
    self.total, self.desc, self.done = total, desc, initial
    self._bar, self._last = None, time.monotonic()
    if jax.process_index() != 0:
      self.desc = ""
    elif interactive():
      from tqdm.auto import tqdm
      self._bar = tqdm(total=total, initial=initial, desc=desc, leave=False, dynamic_ncols=True)

  def update(self, n: int = 1, **postfix: str) -> None:
    self.done += n
    if self._bar is not None:
      if postfix:
        self._bar.set_postfix(postfix)
      self._bar.update(n)
    elif self.desc and time.monotonic() - self._last >= LOG_SECONDS:
      self._last = time.monotonic()
      extra = "".join(f" | {k} {v}" for k, v in postfix.items())
      print(f"{self.desc}: {self.done}/{self.total}{extra}", flush=True)

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()


def bar(items: Iterable[T], total: int, desc: str) -> Iterator[T]:
  """``items`` with a ``Progress`` of ``total`` titled ``desc`` (none when ``desc`` is '')."""
  if not desc:
    yield from items
    return
  p = Progress(total, desc)
  try:
    for item in items:
      yield item
      p.update()
  finally:
    p.close()
