"""TensorBoard event files of a run, in its workdir (tensorboardX: no TensorFlow).

Scalars: ``train/loss``, ``train/accuracy`` (running means over the epoch so far) and
``train/lr`` every ``log_every_steps``; ``val/loss``, ``val/accuracy`` and ``epoch/train_loss``,
``epoch/train_accuracy``, ``epoch/seconds`` every epoch; ``test/*`` (loss, accuracies, macro
precision/recall/F1) at the end. Images: ``curves`` every epoch, ``confusion`` and ``predictions`` at
the end. ``tensorboard --logdir runs`` shows every run under ``runs/`` by its workdir's name
(and the runs a ``--new_run`` set aside as ``NAME/previous/N``).

A resumed run writes a new event file that purges the events after its checkpoint's step,
so TensorBoard shows one line per run, not the abandoned tail of the interrupted one.

tensorboardX is imported, and the event file opened, at the first event, so a run's start-up
does not wait for it (with torch installed, importing tensorboardX imports torch: ~2 s).
"""
import functools
import pathlib
from typing import Any

import numpy as np
from PIL import Image


class Events:
  """Writes a run's events; ``start_step`` > 0: a resumed run (see the module docstring)."""

  def __init__(self, workdir: str | pathlib.Path, start_step: int = 0):
    self._workdir, self._start_step = str(workdir), start_step

  @functools.cached_property
  def _writer(self):
    from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
    return SummaryWriter(self._workdir, purge_step=self._start_step or None, flush_secs=10)

  def scalars(self, prefix: str, values: dict[str, Any], step: int) -> None:
    """``prefix/name`` for each number in ``values`` (other values are skipped)."""
    for name, value in values.items():
      if isinstance(value, (int, float, np.number)) and not isinstance(value, bool):
        self._writer.add_scalar(f"{prefix}/{name}", float(value), step)

  def image(self, tag: str, path: str | pathlib.Path, step: int) -> None:
    """The PNG at ``path`` as image ``tag``."""
    with Image.open(path) as img:
      self._writer.add_image(tag, np.asarray(img.convert("RGB")), step, dataformats="HWC")

  def flush(self) -> None:
    if "_writer" in self.__dict__:
      self._writer.flush()

  def close(self) -> None:
    if "_writer" in self.__dict__:
      self._writer.close()
