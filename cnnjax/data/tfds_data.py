"""CIFAR-10/100, MNIST and Fashion-MNIST as TFDS datasets, prepared and read without TensorFlow.

tfds' stock builders for these datasets need TensorFlow to prepare them. The builders of
``tfds_builders`` read the official files without it and write them, in the official order,
as array_record files that ``tfds.data_source`` reads (class names in the metadata).

They are registered as ``cnnjax_cifar10``, ``cnnjax_cifar100``, ``cnnjax_mnist`` and
``cnnjax_fashion_mnist``, not under the stock names: tfds imports its own catalogue lazily,
and a second builder registered as ``cifar10`` makes that import fail ("Dataset with name
cifar10 already registered"), after which even ``tfds.builder('mnist')`` is not found.
:func:`load_arrays` hides the difference: ``load_arrays('cifar10')`` reads
``cnnjax_cifar10`` when it is prepared, else a stock ``cifar10`` prepared elsewhere (with
TensorFlow, as array_record), and prepares ``cnnjax_cifar10`` on first use when neither is
(downloading the official files, with tfds' progress bars; offline, a ``UserError`` within
seconds).

Prepare ahead, online, or offline from a folder holding the official files (a local archive
is checked against the official sha256, as downloads are)::

  python -m cnnjax.data.tfds_data prepare cifar10 [--data_dir D] [--source_dir DIR]
"""
import argparse
from collections.abc import Iterator, Sequence
import contextlib
import logging
import os
import pathlib
import shutil
import sys
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from cnnjax.data.tfds_builders import BUILDERS, SPLITS
from cnnjax.errors import UserError

_log = logging.getLogger(__name__)

_READ_BATCH = 4096  # Records per `__getitems__` call when reading a split.
class NotPreparedError(UserError):
  """A TFDS dataset is not prepared (and was not to be prepared on first use)."""


def data_dir_or_default(data_dir: str | os.PathLike | None) -> pathlib.Path:
  """``data_dir``, or TFDS's default (``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``)."""
  return pathlib.Path(os.path.expanduser(
      data_dir if data_dir is not None else tfds.core.constants.get_default_data_dir()))




def _entries(data_dir: pathlib.Path, dataset: str) -> set[pathlib.Path]:
  """``data_dir``, its downloads and ``dataset`` folders and what they hold, where present."""
  roots = (data_dir, data_dir / "downloads", data_dir / "downloads" / "extracted",
           data_dir / dataset)
  return {p for root in roots if root.is_dir() for p in (root, *root.iterdir())}


@contextlib.contextmanager
def _no_leftovers_on_failure(data_dir: pathlib.Path, dataset: str) -> Iterator[None]:
  """On any failure (Ctrl-C too), removes what the failed preparation added: tfds'
  ``incomplete.*`` folders, partial ``*.tmp.*`` downloads, and the folders left empty."""
  before = _entries(data_dir, dataset)
  try:
    yield
  except BaseException:
    added = sorted(_entries(data_dir, dataset) - before, key=lambda p: len(p.parts),
                   reverse=True)  # Contents before their folders.
    for path in added:
      if path.name.startswith(tfds.core.constants.INCOMPLETE_PREFIX) or ".tmp." in path.name:
        shutil.rmtree(path, ignore_errors=True)
      elif path.is_dir() and not any(path.iterdir()):
        path.rmdir()
    raise


def prepare(name: str, data_dir: str | os.PathLike | None = None,
            source_dir: str | os.PathLike | None = None) -> str:
  """Writes dataset ``name`` as array_record under ``data_dir``; a no-op when it is there.

  A failed preparation leaves nothing half-written behind.

  Args:
    name: one of ``BUILDERS`` (``'cifar10'``, ``'cifar100'``, ``'mnist'``,
      ``'fashion_mnist'``).
    data_dir: TFDS data dir; default ``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``.
    source_dir: a folder holding the official files (the builder's ``FILES``); without
      it they are downloaded from the official URLs (tfds' progress bars on stderr).
  Returns:
    The folder of the prepared dataset, e.g. ``<data_dir>/cnnjax_cifar10/1.0.0``.
  Raises:
    UserError: unknown ``name``, a file missing from ``source_dir``, a file that is not
      the official one (its sha256 or its contents), or a server that cannot be reached
      (within seconds) or a failed download.
  """
  if name not in BUILDERS:
    raise UserError(f"cannot prepare dataset {name!r}; expected one of {', '.join(BUILDERS)}")
  builder_cls = BUILDERS[name]
  if source_dir is not None:
    if missing := [f for f in builder_cls.FILES
                   if not os.path.isfile(os.path.join(source_dir, f))]:
      raise UserError(f"source dir {source_dir} lacks {', '.join(missing)} for {name}; "
                      f"expected the official file(s) from "
                      f"{', '.join(builder_cls.FILES[f] for f in missing)}")
  root = data_dir_or_default(data_dir)
  with _no_leftovers_on_failure(root, builder_cls.name):
    builder = builder_cls(data_dir=root, file_format="array_record")
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
        manual_dir=source_dir, try_download_gcs=False))
  return os.fspath(builder.data_dir)


def _prepare_command(name: str, data_dir: str | os.PathLike | None) -> str:
  dir_flag = f" --data_dir {data_dir}" if data_dir is not None else ""
  if name in BUILDERS:
    return f"`python -m cnnjax.data.tfds_data prepare {name}{dir_flag}`"
  return f"`tfds build {name} --file_format=array_record{dir_flag}`"


class _NoUnpreparedWarning(logging.Filter):
  """Drops tfds' "Variant folder ... has no dataset_info.json" warning, which
  ``DatasetBuilder.is_prepared()`` logs for every dataset that is not prepared."""

  def filter(self, record: logging.LogRecord) -> bool:
    return not (record.msg == "Variant folder %s has no %s" and record.args
                and record.args[-1] == tfds.core.constants.DATASET_INFO_FILENAME)


@contextlib.contextmanager
def _quiet_probe() -> Iterator[None]:
  """Silences ``_NoUnpreparedWarning``'s warning on absl's logger, for the block."""
  quiet, absl_logger = _NoUnpreparedWarning(), logging.getLogger("absl")
  absl_logger.addFilter(quiet)
  try:
    yield
  finally:
    absl_logger.removeFilter(quiet)


def _open_splits(name: str, tfds_name: str,
                 data_dir: str | os.PathLike | None) -> list[Any] | None:
  """The train and test data sources of ``tfds_name``, or None when it is not prepared.

  Raises:
    UserError: it is prepared in a format ``tfds.data_source`` cannot read (tfrecord).
  """
  with _quiet_probe():
    try:
      return tfds.data_source(tfds_name, split=list(SPLITS), data_dir=data_dir, download=False)
    except tfds.core.DatasetNotFoundError:  # Neither a known builder nor files in data_dir.
      return None
    except Exception:  # tfds' errors for a missing dataset vary; is_prepared() tells.
      builder = tfds.builder(tfds_name, data_dir=data_dir)
      if not builder.is_prepared():
        return None
      formats = sorted(f.value for f in builder.info.available_file_formats())
      if tfds.core.FileFormat.ARRAY_RECORD.value not in formats:
        raise UserError(f"TFDS dataset {tfds_name!r} in {builder.data_dir} is stored as "
                        f"{', '.join(formats)}, which tfds.data_source cannot read; expected "
                        f"array_record: prepare it with {_prepare_command(name, data_dir)}"
                        ) from None
      raise


def _not_prepared(name: str, data_dir: str | os.PathLike | None) -> NotPreparedError:
  where = data_dir_or_default(data_dir)
  command = _prepare_command(name, data_dir)
  if name in BUILDERS:
    return NotPreparedError(
        f"TFDS dataset {name!r} is not prepared in {where}; prepare it with {command} "
        f"(online; offline add --source_dir DIR holding {', '.join(BUILDERS[name].FILES)})"
        f" or pass a local .npz with --config.data.source=/path/{name}.npz")
  return NotPreparedError(
      f"TFDS dataset {name!r} is not prepared as array_record in {where}; expected one of "
      f"{', '.join(BUILDERS)} (prepared on first use, or with `python -m "
      f"cnnjax.data.tfds_data prepare NAME`) or a TFDS dataset built there with {command}")


def _read_split(source: Any, image_shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
  """All records of a tfds data source as ``(images [N, H, W, C] uint8, labels [N] int64)``.

  Reads ``_READ_BATCH`` records per ``__getitems__`` call (1.5-2x faster than one by one).
  ``tfds.testing.mock_data``'s fake reader sets ``__getitems__`` on the instance with the
  wrong arity (tfds 4.9.10), so a reader whose class lacks it is read one by one.
  """
  n = len(source)
  images = np.empty((n, *image_shape), np.uint8)
  labels = np.empty((n,), np.int64)
  batched = hasattr(type(source.data_source), "__getitems__")
  for start in range(0, n, _READ_BATCH):
    keys = list(range(start, min(start + _READ_BATCH, n)))
    records = source.__getitems__(keys) if batched else [source[k] for k in keys]
    images[start:start + len(keys)] = np.stack([r["image"] for r in records])
    labels[start:start + len(keys)] = [r["label"] for r in records]
  return images, labels


def load_arrays(name: str, data_dir: str | os.PathLike | None = None,
                download: bool = True) -> dict[str, Any]:
  """Reads a TFDS image-classification dataset into memory, preparing ours on first use.

  Args:
    name: ``'cifar10'``, ``'cifar100'``, ``'mnist'`` or ``'fashion_mnist'`` (read from
      this module's ``cnnjax_<name>`` builder when prepared, else from the stock tfds
      dataset ``<name>``; when neither is, ``cnnjax_<name>`` is first prepared with
      :func:`prepare`), or any TFDS dataset with a fixed-size uint8 ``image`` and a
      ClassLabel ``label``, prepared as array_record. Works under
      ``tfds.testing.mock_data``.
    data_dir: TFDS data dir; default ``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``.
    download: whether to prepare one of ``BUILDERS`` that is not prepared (downloading its
      official files); if False, that raises ``NotPreparedError``.
  Returns:
    ``{'train': (images, labels), 'test': (images, labels), 'class_names': [str, ...]}``
    with images ``[N, H, W, C]`` uint8 and labels ``[N]`` int64, in the stored order;
    other features (e.g. ``id``) are dropped.
  Raises:
    NotPreparedError: the dataset is not prepared in ``data_dir`` (as array_record) and is
      not one of ``BUILDERS`` to be prepared (or ``download`` is False).
    UserError: the preparation failed (offline: within seconds), or the dataset has no
      fixed-size uint8 ``image`` and ClassLabel ``label``.
  """
  candidates = [BUILDERS[name].name, name] if name in BUILDERS else [name]
  for tfds_name in candidates:
    if (sources := _open_splits(name, tfds_name, data_dir)) is not None:
      break
  else:
    if name not in BUILDERS or not download:
      raise _not_prepared(name, data_dir)
    _log.info("%s is not prepared in %s: preparing it (first use)", name,
              data_dir_or_default(data_dir))
    prepare(name, data_dir)
    tfds_name = candidates[0]
    sources = _open_splits(name, tfds_name, data_dir)
  _log.info("%s: reading TFDS's %s from %s", name, tfds_name, data_dir_or_default(data_dir))
  features = sources[0].dataset_info.features
  image = features["image"] if "image" in features else None
  label = features["label"] if "label" in features else None
  if not isinstance(label, tfds.features.ClassLabel) or image is None:
    raise UserError(f"TFDS dataset {tfds_name!r} has features {sorted(features.keys())}; "
                    "expected an 'image' and a ClassLabel 'label'")
  if len(image.shape) != 3 or None in image.shape or image.np_dtype != np.uint8:
    raise UserError(f"TFDS dataset {tfds_name!r} has {image.np_dtype} images of shape "
                    f"{image.shape}; expected fixed-size uint8 images [H, W, C]")
  arrays: dict[str, Any] = {split: _read_split(source, image.shape)
                            for split, source in zip(SPLITS, sources)}
  arrays["class_names"] = list(label.names)
  return arrays


def main(argv: Sequence[str] | None = None) -> int:
  """``python -m cnnjax.data.tfds_data prepare NAME [--data_dir D] [--source_dir DIR]``."""
  parser = argparse.ArgumentParser(
      prog="python -m cnnjax.data.tfds_data",
      description="Prepare CIFAR/MNIST TFDS datasets (array_record) without TensorFlow.")
  commands = parser.add_subparsers(dest="command", required=True)
  prep = commands.add_parser(
      "prepare", help="download (or read from --source_dir) and write a dataset")
  prep.add_argument("name", choices=list(BUILDERS))
  prep.add_argument("--data_dir", help="TFDS data dir (default $TFDS_DATA_DIR or "
                    "~/tensorflow_datasets)")
  prep.add_argument("--source_dir", help="offline: folder holding the official files "
                    "(e.g. cifar-10-python.tar.gz, or the four MNIST *.gz idx files)")
  args = parser.parse_args(argv)
  try:
    path = prepare(args.name, args.data_dir, args.source_dir)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"{args.name} prepared in {path}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
