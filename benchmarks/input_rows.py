r"""``--mode=input``: the training input pipelines (``cnnjax.data.pipeline``) against the
train step they feed.

  python -m benchmarks --mode=input [--source cifar10.npz] [--folder hymenoptera/train]
      [--workers 2] [--windows 7] [--window_seconds 3] [--out FILE]

Measured in-process and with ``--workers`` worker processes: CIFAR-10 with crop (pad 4) +
flip at each of ``--batch_sizes``, the Keras ``ImageDataGenerator`` set (rotation 40,
shifts 0.2, shear 0.2, zoom 0.2, flip, nearest fill), and an image folder decoded per
record with a random resized crop to 224 + flip. In the same run, what the
``--step_model`` (BN CNN) train step consumes (synthetic batches, at each of
``--batch_sizes``), and the ratio pipeline / train step, whose target is >= 3. Without
``--source`` the CIFAR-10 rows read uniform uint8 noise of CIFAR-10's training shape
``[50000, 32, 32, 3]``; without ``--folder`` the folder rows read generated JPEGs in a
temporary directory; both are named 'synthetic' in the table.
"""
import contextlib
import dataclasses
import pathlib
import tempfile
import time
from typing import Iterator

import numpy as np
from PIL import Image

from benchmarks import harness, model_rows
from benchmarks.harness import Measurement, Windows
from cnnjax.data import folders, pipeline, sources
from cnnjax.data.augment import KerasAugment
from cnnjax.errors import UserError
from cnnjax.models import create_model

KERAS_AUGMENT = {"rotation": 40.0, "width_shift": 0.2, "height_shift": 0.2, "shear": 0.2,
                 "zoom": 0.2, "horizontal_flip": True, "fill_mode": "nearest"}
PIPELINE_TARGET = 3.0  # the train pipeline must deliver >= 3x what the train step consumes
CIFAR_TRAIN_SHAPE = (50_000, 32, 32, 3)  # CIFAR-10's training images
# The synthetic folder: classes, JPEGs per class, (width, height) of each.
FOLDER_CLASSES, FOLDER_IMAGES, FOLDER_IMAGE_SIZE = 2, 32, (500, 375)


@dataclasses.dataclass(frozen=True)
class InputData:
  """What the pipelines read.

  Attributes:
    train: CIFAR-10's training ``(images [N, 32, 32, 3] uint8, labels [N])``.
    cifar: its name in the table, 'CIFAR-10' or 'synthetic CIFAR-10'.
    folder: the image folder ``root/<class>/<image>``.
    folder_name: its name in the table: the last two parts of its path, or 'synthetic folder'.
    description: where both come from, for the printed header and the report.
  """
  train: pipeline.Arrays
  cifar: str
  folder: folders.ImageFolder
  folder_name: str
  description: str

  @property
  def crop_flip(self) -> str:
    """The name of the crop + flip rows."""
    return f"{self.cifar} crop + flip"


def _synthetic_folder(root: pathlib.Path) -> pathlib.Path:
  """Writes ``root/<class>/<i>.jpg``: smooth random RGB images (upsampled 16x12 noise)."""
  rng = np.random.default_rng(0)
  for c in range(FOLDER_CLASSES):
    (root / f"class{c}").mkdir(parents=True)
    for i in range(FOLDER_IMAGES):
      small = Image.fromarray(rng.integers(0, 256, (12, 16, 3), np.uint8))
      small.resize(FOLDER_IMAGE_SIZE, Image.BILINEAR).save(root / f"class{c}" / f"{i}.jpg",
                                                           quality=90)
  return root


@contextlib.contextmanager
def input_data(source: str | None, folder: str | None) -> Iterator[InputData]:
  """The CIFAR-10 data of ``source`` (``cnnjax.data.sources.load``) and the image folder
  ``folder``; each synthetic when None (the folder generated in a temporary directory,
  removed on exit)."""
  with contextlib.ExitStack() as stack:
    if source is None:
      rng = np.random.default_rng(0)
      train = (rng.integers(0, 256, CIFAR_TRAIN_SHAPE, np.uint8),
               rng.integers(0, model_rows.NUM_CLASSES, CIFAR_TRAIN_SHAPE[0]))
      cifar, cifar_from = "synthetic CIFAR-10", "uniform uint8 noise (no --source)"
    else:
      train = sources.load(source).train
      if train[0].shape[1:] != CIFAR_TRAIN_SHAPE[1:]:
        raise UserError(f"--source={source} holds images {list(train[0].shape[1:])}; "
                        f"expected CIFAR-10's {list(CIFAR_TRAIN_SHAPE[1:])}")
      cifar, cifar_from = "CIFAR-10", f"--source={source}"
    if folder is None:
      root = _synthetic_folder(pathlib.Path(stack.enter_context(tempfile.TemporaryDirectory())))
      image_folder, folder_name = folders.ImageFolder(root), "synthetic folder"
      w, h = FOLDER_IMAGE_SIZE
      folder_from = f"generated {w}x{h} JPEGs in {FOLDER_CLASSES} classes (no --folder)"
    else:
      image_folder = folders.ImageFolder(folder)
      folder_name = "/".join(image_folder.root.resolve().parts[-2:])
      folder_from = f"--folder={folder}"
    description = (f"Data: {cifar}, {len(train[0]):,} images, {cifar_from}; {folder_name}, "
                   f"{len(image_folder):,} images, {folder_from}.")
    yield InputData(train, cifar, image_folder, folder_name, description)


def _pipeline_row(name: str, ds, batch_size: int, workers: int,
                  windows: Windows) -> Measurement:
  """Images/second delivered by ``prefetch(ds.repeat(), workers)``."""
  start = time.perf_counter()
  batches = pipeline.prefetch(ds.repeat(), workers=workers)
  next(batches)
  first = time.perf_counter() - start
  side = harness.Local(lambda: len(next(batches)["label"]), lambda: None)
  measured = harness.timed({name: side}, batch_size, windows)[name]
  batches.close()
  return dataclasses.replace(measured, workers=workers, first_batch_seconds=first)


def _train_step_row(step_model: str, batch_size: int, windows: Windows) -> Measurement:
  """Images/second the ``step_model`` train step consumes (Adam, synthetic CIFAR-shaped
  batches), as ``cnnjax.steps.Runner`` runs it."""
  dispatch, _ = model_rows.train_dispatch(
      create_model(step_model, num_classes=model_rows.NUM_CLASSES), (),
      model_rows.synthetic_batch(batch_size, CIFAR_TRAIN_SHAPE[1:]))
  name = f"{step_model} train step (synthetic)"
  return harness.timed({name: harness.jax_side(dispatch, batch_size)[0]}, batch_size,
                       windows)[name]


def input_rows(data: InputData, batch_sizes: list[int], workers: int, folder_batch_size: int,
               step_model: str, windows: Windows) -> Iterator[Measurement]:
  """The rows, measured one after the other: crop + flip at each of ``batch_sizes``
  in-process (and with ``workers`` processes at the largest), the Keras set and the folder
  (``folder_batch_size``) in-process and with ``workers``, then the train step of
  ``step_model`` at each of ``batch_sizes``."""
  counts = [0] + ([workers] if workers else [])
  crop_flip = KerasAugment(crop_padding=4, horizontal_flip=True)
  largest = max(batch_sizes)
  for b in batch_sizes:
    for w in counts if b == largest else [0]:
      yield _pipeline_row(data.crop_flip, pipeline.train_epoch(data.train, b, 0, 0, crop_flip),
                          b, w, windows)
  keras = pipeline.train_epoch(data.train, largest, 0, 0, KerasAugment(**KERAS_AUGMENT))
  for w in counts:
    yield _pipeline_row(f"{data.cifar} Keras set", keras, largest, w, windows)
  flip = KerasAugment(horizontal_flip=True)
  for w in counts:
    ds = pipeline.folder_epoch(data.folder, folder_batch_size, 0, 0, 224, flip)
    yield _pipeline_row(f"{data.folder_name} decode + resized crop 224 + flip", ds,
                        folder_batch_size, w, windows)
  for b in batch_sizes:
    yield _train_step_row(step_model, b, windows)


def ratios(rows: list[Measurement], data: InputData) -> list[str]:
  """``pipeline / train step`` at each batch size measured for both (target >= 3x)."""
  lines = []
  steps = {r.batch_size: r for r in rows if r.workers is None}
  for r in rows:
    if r.name == data.crop_flip and r.workers == 0 and r.batch_size in steps:
      step = steps[r.batch_size]
      ratio = r.images_per_second / step.images_per_second
      verdict = "meets" if ratio >= PIPELINE_TARGET else "MISSES"
      busy = " (busy windows)" if r.busy or step.busy else ""
      lines.append(f"batch {r.batch_size}: {data.crop_flip} pipeline / {step.name} = "
                   f"{r.images_per_second:,.0f} / {step.images_per_second:,.0f} = {ratio:.1f}x, "
                   f"{verdict} the >= {PIPELINE_TARGET:.0f}x target{busy}")
  return lines


INPUT_HEADER = [
    "| benchmark | batch | workers | images/s | windows kept | other processes (cores) "
    "| first batch (s) |",
    "|---|---|---|---|---|---|---|"]


def format_row(r: Measurement) -> str:
  """A markdown table row of ``r``."""
  workers = "-" if r.workers is None else ("in-process" if r.workers == 0 else str(r.workers))
  kept = f"{len(r.kept)}/{len(r.rates)}" + (" busy: all windows" if r.busy else "")
  first = "-" if r.first_batch_seconds is None else f"{r.first_batch_seconds:.2f}"
  others = f"{min(r.others):.2f}-{max(r.others):.2f}"
  return (f"| {r.name} | {r.batch_size} | {workers} | {r.images_per_second:,.0f} | {kept} | "
          f"{others} | {first} |")
