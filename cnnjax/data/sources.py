"""Where the arrays come from: a local ``.npz``, a folder of idx files, or TFDS by name.

Every source yields the same ``Dataset``: uint8 images ``[N, H, W, C]`` and int64
labels ``[N]`` for ``train`` and ``test``, in memory (CIFAR-10 is 180 MB), plus class
names and optional named subsets of the test set to report apart.
"""
import dataclasses
import os
import pathlib

import numpy as np

from cnnjax.data.pipeline import Arrays
from cnnjax.errors import UserError

NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")


@dataclasses.dataclass
class Dataset:
  """A train and a test split in memory.

  Attributes:
    train, test: ``(images [N, H, W, C] uint8, labels [N] int64)``.
    class_names: ``[K]`` names in label order.
    test_subsets: name -> bool mask ``[N_test]`` of test examples also reported apart
      (``lossless`` for ../shared/data/cifar10.npz, whose other 9k images went through JPEG).
  """
  train: Arrays
  test: Arrays
  class_names: list[str]
  test_subsets: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)

  def head(self, n: int) -> "Dataset":
    """The first ``n`` train and test examples (for quick runs)."""
    return Dataset((self.train[0][:n], self.train[1][:n]), (self.test[0][:n], self.test[1][:n]),
                   self.class_names, {k: v[:n] for k, v in self.test_subsets.items()})

  @property
  def image_shape(self) -> tuple[int, ...]:
    return tuple(self.train[0].shape[1:])


def _checked(name: str, images: np.ndarray, labels: np.ndarray) -> Arrays:
  images, labels = np.asarray(images), np.asarray(labels).astype(np.int64).reshape(-1)
  if images.ndim == 3:  # [N, H, W] grey images
    images = images[..., None]
  if images.ndim != 4 or images.dtype != np.uint8:
    raise UserError(f"{name} images have shape {images.shape} and dtype {images.dtype}; "
                    "expected uint8 [N, H, W, C]")
  if len(images) != len(labels):
    raise UserError(f"{name} has {len(images)} images but {len(labels)} labels")
  return images, labels


def load_npz(path: str | os.PathLike) -> Dataset:
  """Reads ``x_train, y_train, x_test, y_test`` (and optional ``class_names``,
  ``test_is_lossless``) from an ``.npz`` file, the layout of ../shared/data."""
  with np.load(path) as f:
    missing = [k for k in NPZ_KEYS if k not in f]
    if missing:
      raise UserError(f"{path} has no array(s) {missing}; expected {list(NPZ_KEYS)}")
    train = _checked(f"{path}:train", f["x_train"], f["y_train"])
    test = _checked(f"{path}:test", f["x_test"], f["y_test"])
    num_classes = int(max(train[1].max(), test[1].max())) + 1
    names = [str(n) for n in f["class_names"]] if "class_names" in f else [str(i) for i in range(num_classes)]
    subsets = {"lossless": f["test_is_lossless"].astype(bool)} if "test_is_lossless" in f else {}
  return Dataset(train, test, names, subsets)


def load_idx(folder: str | os.PathLike) -> Dataset:
  """The four official MNIST/Fashion-MNIST idx files in ``folder`` (gzipped or not)."""
  from cnnjax.data import idx
  splits = idx.load_idx_folder(folder)
  train, test = (_checked(f"{folder}:{s}", *splits[s]) for s in ("train", "test"))
  return Dataset(train, test, [str(i) for i in range(int(train[1].max()) + 1)])


def load_tfds(name: str, data_dir: str | None) -> Dataset:
  """A TFDS dataset prepared as array_record, read TensorFlow-free (``tfds.data_source``)."""
  from cnnjax.data import tfds_data
  arrays = tfds_data.load_arrays(name, data_dir=data_dir)
  train, test = (_checked(f"tfds:{name}:{s}", *arrays[s]) for s in ("train", "test"))
  return Dataset(train, test, list(arrays["class_names"]))


def load(source: str, data_dir: str | None = None) -> Dataset:
  """Dispatches on ``source``: an ``.npz`` file, a folder of idx files, or a TFDS name.

  Anything that looks like a path (has a separator or a file suffix) must exist; any
  other string is taken as a TFDS dataset name.
  """
  path = pathlib.Path(os.path.expanduser(source))
  if path.is_file():
    return load_npz(path)
  if path.is_dir():
    return load_idx(path)
  if os.sep in source or path.suffix:
    raise UserError(f"data file {path.absolute()} not found; expected an .npz with {list(NPZ_KEYS)} "
                    "or a folder of idx files (offline, point --config.data.source at local data)")
  return load_tfds(source, data_dir)
