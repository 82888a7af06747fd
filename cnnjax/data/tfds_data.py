"""CIFAR-10/100, MNIST and Fashion-MNIST as TFDS datasets, prepared and read without TensorFlow.

tfds' stock builders for these datasets need TensorFlow to prepare them. The builders here
read the official files with tarfile, a restricted unpickler (``cnnjax.safe_pickle``: the
CIFAR batches may name only numpy's array globals), gzip and numpy, store ``image`` as a
uint8 ``tfds.features.Tensor`` and ``label`` as a ``ClassLabel`` (class names in the
dataset's metadata), in the official order, as array_record files that
``tfds.data_source`` reads.

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
import abc
import argparse
from collections.abc import Iterator, Sequence
import contextlib
import hashlib
import logging
import os
import pathlib
import shutil
import sys
import tarfile
import threading
from typing import Any, ClassVar
import urllib.error
import urllib.parse
import urllib.request

import numpy as np
import tensorflow_datasets as tfds

from cnnjax import safe_pickle
from cnnjax.data import idx
from cnnjax.errors import UserError

_log = logging.getLogger(__name__)

SPLITS = ("train", "test")
_READ_BATCH = 4096  # Records per `__getitems__` call when reading a split.
_REACH_TIMEOUT = 4.0  # Seconds a download server has to answer before we call it offline.
# The globals CIFAR's pickled batches name (numpy arrays); numpy 2 pickles `numpy._core`.
_CIFAR_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): np._core.multiarray._reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): np._core.multiarray._reconstruct,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}

_CIFAR100_NAMES = tuple("""
    apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus
    butterfly camel can castle caterpillar cattle chair chimpanzee clock cloud cockroach
    couch crab crocodile cup dinosaur dolphin elephant flatfish forest fox girl hamster
    house kangaroo keyboard lamp lawn_mower leopard lion lizard lobster man maple_tree
    motorcycle mountain mouse mushroom oak_tree orange orchid otter palm_tree pear
    pickup_truck pine_tree plain plate poppy porcupine possum rabbit raccoon ray road rocket
    rose sea seal shark shrew skunk skyscraper snail snake spider squirrel streetcar
    sunflower sweet_pepper table tank telephone television tiger tractor train trout tulip
    turtle wardrobe whale willow_tree wolf woman worm""".split())
_IDX_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
              "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
# Size and sha256 that tfds checks each download against, and `_official_paths` a local
# file; tfds itself ships those of the MNIST and Fashion-MNIST downloads, not those of the
# CIFAR python archives.
_UrlInfo = tfds.download.checksums.UrlInfo


class NotPreparedError(UserError):
  """A TFDS dataset is not prepared (and was not to be prepared on first use)."""


def data_dir_or_default(data_dir: str | os.PathLike | None) -> pathlib.Path:
  """``data_dir``, or TFDS's default (``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``)."""
  return pathlib.Path(os.path.expanduser(
      data_dir if data_dir is not None else tfds.core.constants.get_default_data_dir()))


def _unreachable(url: str, timeout: float = _REACH_TIMEOUT) -> str | None:
  """Why ``url``'s server cannot be reached, or None when it answers a HEAD request.

  One attempt, in a daemon thread given ``timeout`` seconds: a name lookup has no timeout
  of its own, and tfds' downloader retries it for minutes.
  """
  outcome = []

  def head() -> None:
    try:
      urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout).close()
      outcome.append(None)
    except urllib.error.HTTPError:  # An answer, if not a 200 one.
      outcome.append(None)
    except (OSError, ValueError) as e:  # URLError and timeouts are OSErrors.
      outcome.append(f"{type(e).__name__}: {getattr(e, 'reason', e)}")

  thread = threading.Thread(target=head, daemon=True)
  thread.start()
  thread.join(timeout)
  return outcome[0] if outcome else f"no answer within {timeout:g} s"


def _offline_error(dataset: str, files: dict[str, str], reason: str) -> UserError:
  return UserError(
      f"cannot download {dataset}'s {', '.join(files)} ({reason}); offline, pass a local .npz "
      f"(--config.data.source=/path/{dataset}.npz), or prepare it from the official "
      f"file(s) with `python -m cnnjax.data.tfds_data prepare {dataset} --source_dir DIR`, "
      "or use --config.data.source=mnist (shipped with cnnjax)")


def _sha256(path: os.PathLike) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    while chunk := f.read(1 << 20):
      digest.update(chunk)
  return digest.hexdigest()


class _OfficialFilesBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Writes ``image`` (uint8 ``[H, W, C]``) and ``label`` (ClassLabel) from official files.

  Subclasses name the files and read them in ``_read``; records keep the files' order.
  """
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Official files read with numpy; no TensorFlow needed."}
  # tfds gives `dl_manager.manual_dir` only to builders that set instructions.
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "Offline: put the official files (the builder's FILES) in the manual dir, or run "
      "`python -m cnnjax.data.tfds_data prepare NAME --source_dir DIR_WITH_THE_FILES`.")

  DATASET: ClassVar[str]  # The name users pass, e.g. 'cifar10'.
  FILES: ClassVar[dict[str, str]]  # Official file name -> download URL.
  IMAGE_SHAPE: ClassVar[tuple[int, int, int]]
  CLASS_NAMES: ClassVar[tuple[str, ...]]
  HOMEPAGE: ClassVar[str]

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=f"{self.DATASET} read from its official files without TensorFlow.",
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Tensor(shape=self.IMAGE_SHAPE, dtype=np.uint8),
            "label": tfds.features.ClassLabel(names=self.CLASS_NAMES),
        }),
        supervised_keys=("image", "label"),
        homepage=self.HOMEPAGE,
        disable_shuffling=True,  # Keep the official order.
    )

  def _official_paths(self,
                      dl_manager: tfds.download.DownloadManager) -> dict[str, os.PathLike]:
    """Paths of the official ``FILES``, from the manual dir (``--source_dir``) when it holds
    them all (checked against ``url_infos``' sha256 where known), else downloaded."""
    try:
      manual_dir = dl_manager.manual_dir
    except AssertionError:  # tfds' way of saying: no manual dir, or an empty one.
      manual_dir = None
    if manual_dir is not None and all((manual_dir / f).is_file() for f in self.FILES):
      paths = {f: manual_dir / f for f in self.FILES}
      for f, url in self.FILES.items():
        info = (self.url_infos or {}).get(url)
        if info is not None and (actual := _sha256(paths[f])) != info.checksum:
          raise UserError(f"{paths[f]}: sha256 {actual} differs from the official {f}'s "
                          f"{info.checksum}; expected the file from {url}")
      return paths
    for url in {urllib.parse.urlsplit(u).netloc: u for u in self.FILES.values()}.values():
      if reason := _unreachable(url):
        raise _offline_error(self.DATASET, self.FILES, reason)
    try:
      return dl_manager.download(self.FILES)
    except OSError as e:  # requests' ConnectionError is an OSError.
      raise _offline_error(self.DATASET, self.FILES, type(e).__name__) from None

  def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Any]:
    arrays = self._read(self._official_paths(dl_manager))
    for split, (images, labels) in arrays.items():
      if images.shape[1:] != self.IMAGE_SHAPE or len(labels) != len(images):
        raise UserError(f"{self.DATASET} {split}: the official files gave images "
                        f"{images.shape} and labels {labels.shape}; expected "
                        f"[N, {', '.join(map(str, self.IMAGE_SHAPE))}] and [N]")
    return {split: self._generate_examples(*arrays[split]) for split in SPLITS}

  def _generate_examples(self, images: np.ndarray,
                         labels: np.ndarray) -> Iterator[tuple[int, dict[str, Any]]]:
    for i, (image, label) in enumerate(zip(images, labels)):
      yield i, {"image": image, "label": label}

  @abc.abstractmethod
  def _read(self, paths: dict[str, os.PathLike]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{split: (images [N, H, W, C] uint8, labels [N] int64)}`` from the official files."""


class _CifarBuilder(_OfficialFilesBuilder, skip_registration=True):
  """CIFAR from the python-pickle archive ``cifar-1*-python.tar.gz``."""
  IMAGE_SHAPE = (32, 32, 3)
  HOMEPAGE = "https://www.cs.toronto.edu/~kriz/cifar.html"
  MEMBERS: ClassVar[dict[str, tuple[str, ...]]]  # Split -> pickled batches in the archive.
  META_MEMBER: ClassVar[str]
  LABEL_KEY: ClassVar[bytes]
  NAMES_KEY: ClassVar[bytes]

  def _read(self, paths: dict[str, os.PathLike]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    (archive,) = paths.values()
    wanted = {self.META_MEMBER, *(m for ms in self.MEMBERS.values() for m in ms)}
    expected = f"expected the official {', '.join(self.FILES.values())}"
    pickles = {}
    try:
      with tarfile.open(archive, "r:gz") as tar:
        for member in tar:
          name = os.path.basename(member.name)
          if member.isfile() and name in wanted:
            pickles[name] = safe_pickle.load(tar.extractfile(member), _CIFAR_GLOBALS,
                                             f"{archive}:{member.name}", encoding="bytes")
      if missing := sorted(wanted - pickles.keys()):
        raise UserError(f"{archive}: no {', '.join(missing)} inside; {expected}")
      names = tuple(n.decode() for n in pickles[self.META_MEMBER][self.NAMES_KEY])
      arrays = {}
      for split, members in self.MEMBERS.items():
        data = np.concatenate([np.asarray(pickles[m][b"data"], np.uint8) for m in members])
        labels = np.concatenate([np.asarray(pickles[m][self.LABEL_KEY], np.int64)
                                 for m in members])
        # Each row is 1024 red, then 1024 green, then 1024 blue values, row-major.
        arrays[split] = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels
    except (tarfile.TarError, OSError, EOFError, AttributeError, KeyError, TypeError,
            ValueError) as e:
      raise UserError(f"{archive}: cannot read it ({type(e).__name__}: {e}); "
                      f"{expected}") from None
    if names != self.CLASS_NAMES:
      raise UserError(f"{archive}: class names {names[:3]}... differ from the official "
                      f"{self.DATASET} names {self.CLASS_NAMES[:3]}...; {expected}")
    return arrays


class _IdxBuilder(_OfficialFilesBuilder, skip_registration=True):
  """MNIST-style datasets from the four gzipped idx files."""
  IMAGE_SHAPE = (28, 28, 1)

  def _read(self, paths: dict[str, os.PathLike]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    arrays = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
      images = idx.read_idx(paths[f"{prefix}-images-idx3-ubyte.gz"], ndim=3)
      labels = idx.read_idx(paths[f"{prefix}-labels-idx1-ubyte.gz"], ndim=1)
      arrays[split] = images[..., None], labels.astype(np.int64)
    return arrays


class CnnjaxCifar10(_CifarBuilder):
  """CIFAR-10: 50,000 train and 10,000 test 32x32 RGB images of 10 classes."""
  name = "cnnjax_cifar10"
  DATASET = "cifar10"
  FILES = {"cifar-10-python.tar.gz": "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"}
  CLASS_NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                 "ship", "truck")
  MEMBERS = {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)}
  META_MEMBER = "batches.meta"
  LABEL_KEY = b"labels"
  NAMES_KEY = b"label_names"
  url_infos = {FILES["cifar-10-python.tar.gz"]: _UrlInfo(
      size=170_498_071, filename="cifar-10-python.tar.gz",
      checksum="6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce")}


class CnnjaxCifar100(_CifarBuilder):
  """CIFAR-100 with its 100 fine labels: 50,000 train and 10,000 test 32x32 RGB images."""
  name = "cnnjax_cifar100"
  DATASET = "cifar100"
  FILES = {"cifar-100-python.tar.gz":
           "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"}
  CLASS_NAMES = _CIFAR100_NAMES
  MEMBERS = {"train": ("train",), "test": ("test",)}
  META_MEMBER = "meta"
  LABEL_KEY = b"fine_labels"
  NAMES_KEY = b"fine_label_names"
  url_infos = {FILES["cifar-100-python.tar.gz"]: _UrlInfo(
      size=169_001_437, filename="cifar-100-python.tar.gz",
      checksum="85cd44d02ba6437773c5bbd22e183051d648de2e7d6b014e1ef29b855ba677a7")}


class CnnjaxMnist(_IdxBuilder):
  """MNIST: 60,000 train and 10,000 test 28x28 grayscale digits.

  Downloaded from the mirror tfds uses (the same files as on yann.lecun.com).
  """
  name = "cnnjax_mnist"
  DATASET = "mnist"
  HOMEPAGE = "http://yann.lecun.com/exdb/mnist/"
  FILES = {f: f"https://storage.googleapis.com/cvdf-datasets/mnist/{f}" for f in _IDX_FILES}
  CLASS_NAMES = tuple("0123456789")


class CnnjaxFashionMnist(_IdxBuilder):
  """Fashion-MNIST: 60,000 train and 10,000 test 28x28 grayscale clothes, 10 classes."""
  name = "cnnjax_fashion_mnist"
  DATASET = "fashion_mnist"
  HOMEPAGE = "https://github.com/zalandoresearch/fashion-mnist"
  FILES = {f: f"http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/{f}"
           for f in _IDX_FILES}
  CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                 "Sneaker", "Bag", "Ankle boot")


BUILDERS: dict[str, type[_OfficialFilesBuilder]] = {
    b.DATASET: b for b in (CnnjaxCifar10, CnnjaxCifar100, CnnjaxMnist, CnnjaxFashionMnist)}


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
