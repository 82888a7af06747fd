"""The TFDS builders of CIFAR-10/100, MNIST and Fashion-MNIST that need no TensorFlow
(``tfds_data`` prepares and reads them): the official files read with tarfile, a restricted
unpickler (``cnnjax.safe_pickle``: the CIFAR batches may name only numpy's array globals),
gzip and numpy; ``image`` a uint8 ``tfds.features.Tensor``, ``label`` a ``ClassLabel``; a
local file checked against the official sha256, as downloads are; offline, a ``UserError``
within seconds (``_unreachable``) instead of tfds' minutes of retries.
"""
import abc
from collections.abc import Iterator
import hashlib
import os
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

SPLITS = ("train", "test")
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
