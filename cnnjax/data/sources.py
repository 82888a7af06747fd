"""Where the arrays come from: a local ``.npz``, a folder of idx files, an image folder,
Tiny ImageNet's zip, or TFDS by name (MNIST, without a prepared TFDS copy, from the official files shipped in
``MNIST_DIR``).

Every source yields the same ``Dataset``: uint8 images ``[N, H, W, C]`` and int64
labels ``[N]`` for ``train`` and ``test``, in memory (CIFAR-10 is 180 MB), plus class
names, optional named subsets of the test set to report apart and, if the source has one,
a validation split.
"""
import concurrent.futures
import dataclasses
import os
import pathlib
import threading
import zipfile

import numpy as np

from cnnjax.errors import UserError

Arrays = tuple[np.ndarray, np.ndarray]  # images [N, H, W, C] uint8, labels [N] int64

NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")
# The four official MNIST idx files (60k train, 10k test, official order), shipped as package data.
MNIST_DIR = pathlib.Path(__file__).parent / "mnist"
_READ_BYTES = 1 << 24  # an .npz's arrays are read in pieces of 16 MB (``_npy_rows``)
# The .npz being read ahead (``read_ahead``): ``_ahead_key`` -> the Dataset's future.
_AHEAD: dict[tuple, concurrent.futures.Future] = {}



@dataclasses.dataclass
class Dataset:
  """A train and a test split in memory.

  Attributes:
    train, test: ``(images [N, H, W, C] uint8, labels [N] int64)``; ``test`` may be empty
      (an image folder of class folders only), and is then the validation split.
    class_names: ``[K]`` names in label order.
    test_subsets: name -> bool mask ``[N_test]`` of test examples also reported apart
      (``lossless`` for ../shared/data/cifar10.npz, whose other 9k images went through JPEG).
    val: the source's own validation split (an image folder's ``val/``), or None: then
      ``data.val_size`` examples are split off ``train``.
  """
  train: Arrays
  test: Arrays
  class_names: list[str]
  test_subsets: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
  val: Arrays | None = None
  origin: str = ""  # where a named dataset was read from (TFDS's copy or the shipped MNIST)

  def head(self, n: int) -> "Dataset":
    """The first ``n`` train, validation and test examples (for quick runs)."""
    def first(split: Arrays | None) -> Arrays | None:
      return None if split is None else (split[0][:n], split[1][:n])
    return dataclasses.replace(self, train=first(self.train), test=first(self.test),
                               test_subsets={k: v[:n] for k, v in self.test_subsets.items()},
                               val=first(self.val))

  @property
  def image_shape(self) -> tuple[int, ...]:
    return tuple(self.train[0].shape[1:])


def checked_arrays(name: str, images: np.ndarray, labels: np.ndarray) -> Arrays:
  """``(images [N, H, W, C] uint8, labels [N] int64)``, or a UserError naming ``name``;
  greyscale ``[N, H, W]`` images gain a channel axis."""
  images, labels = np.asarray(images), np.asarray(labels).reshape(-1)
  if labels.dtype.kind not in "iub":
    bad = labels[~np.isclose(labels, np.round(labels))] if labels.dtype.kind == "f" else labels
    if labels.dtype.kind != "f" or len(bad):
      raise UserError(f"{name} labels have dtype {labels.dtype} (e.g. {bad.flat[0].item()!r}); expected "
                      "integer class indices 0..K-1")
  labels = labels.astype(np.int64)
  if images.ndim == 3:  # [N, H, W] grey images
    images = images[..., None]
  if images.ndim != 4 or images.dtype != np.uint8:
    raise UserError(f"{name} images have shape {images.shape} and dtype {images.dtype}; "
                    "expected uint8 [N, H, W, C]")
  if len(images) != len(labels):
    raise UserError(f"{name} has {len(images)} images but {len(labels)} labels")
  return images, labels


def read_ahead(source: str, limit: int = 0) -> None:
  """Starts reading ``source`` in a thread if it is a local ``.npz`` file (other sources:
  nothing), for the next ``load(source, limit=limit)`` to take: a command calls it as soon
  as its config is known, so that the read (1-2 s for CIFAR-10, mostly outside the GIL)
  overlaps the import of JAX. This module imports no JAX."""
  path = pathlib.Path(os.path.expanduser(source))
  _AHEAD.clear()  # one read ahead at a time: an untaken one (the command ended first) goes
  if path.suffix != ".npz" or not path.is_file():
    return
  future = _AHEAD[_ahead_key(path, limit)] = concurrent.futures.Future()

  def read() -> None:
    try:
      future.set_result(_read_npz(path, limit))
    except BaseException as e:  # pylint: disable=broad-except  # raised again by load_npz
      future.set_exception(e)

  # A daemon: a command that ends without loading does not wait for the read.
  threading.Thread(target=read, name="cnnjax-read-ahead", daemon=True).start()


def load_npz(path: str | os.PathLike, limit: int = 0) -> Dataset:
  """Reads ``x_train, y_train, x_test, y_test`` (and optional ``class_names``,
  ``test_is_lossless``) from an ``.npz`` file, the layout of ../shared/data. ``limit`` > 0:
  the first ``limit`` examples of each split, read alone (the class count still comes from
  all the labels). A read started by ``read_ahead`` is awaited and taken (once)."""
  ahead = _AHEAD.pop(_ahead_key(path, limit), None)
  return ahead.result() if ahead is not None else _read_npz(path, limit)


def _ahead_key(path: str | os.PathLike, limit: int) -> tuple | None:
  """What a read ahead must match: the file (its path, size and modification time) and
  ``limit``; None where there is no such file."""
  path = pathlib.Path(path).resolve()
  try:
    stat = path.stat()
  except OSError:
    return None
  return path, stat.st_size, stat.st_mtime_ns, limit


def _read_npz(path: str | os.PathLike, limit: int) -> Dataset:
  """``load_npz``'s read."""
  if not zipfile.is_zipfile(path):
    raise UserError(f"{path} is not an .npz archive; expected numpy.savez's zip of arrays "
                    f"{list(NPZ_KEYS)}")
  with np.load(path) as f, zipfile.ZipFile(path) as zf:
    missing = [k for k in NPZ_KEYS if k not in f]
    if missing:
      raise UserError(f"{path} has no array(s) {missing}; expected {list(NPZ_KEYS)}")
    labels = {k: f[k] for k in ("y_train", "y_test")}
    images = {k: _npy_rows(zf, k, limit or None) for k in ("x_train", "x_test")}
    cut = slice(None, limit or None)
    train = checked_arrays(f"{path}:train", images["x_train"], labels["y_train"][cut])
    test = checked_arrays(f"{path}:test", images["x_test"], labels["y_test"][cut])
    largest = max(int(np.max(v, initial=0)) for v in labels.values())  # dtypes checked above
    names = ([str(n) for n in f["class_names"]] if "class_names" in f
             else [str(i) for i in range(int(largest) + 1)])
    subsets = {"lossless": f["test_is_lossless"][cut].astype(bool)} if "test_is_lossless" in f else {}
  return Dataset(train, test, names, subsets)


def _npy_rows(zf: zipfile.ZipFile, key: str, rows: int | None = None) -> np.ndarray:
  """Array ``key`` of an open .npz: its first ``rows`` rows (all where None), without
  reading the rest, read straight into the array in pieces of ``_READ_BYTES`` (np.load's
  256 KB reads took 2.2x as long on CIFAR-10's images)."""
  with zf.open(f"{key}.npy") as f:
    version = np.lib.format.read_magic(f)
    read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                   else np.lib.format.read_array_header_2_0)
    shape, fortran_order, dtype = read_header(f)
    if dtype.hasobject or not shape:
      raise UserError(f"{zf.filename}:{key} is not a numeric array of rows; expected "
                      "numpy.savez's layout")
    count = shape[0] if rows is None else min(rows, shape[0])
    if fortran_order:  # its rows are not contiguous: np.load's own reader, the whole array
      with zf.open(f"{key}.npy") as whole:
        return np.lib.format.read_array(whole)[:count]
    out = np.empty((count, *shape[1:]), dtype)
    data = out.reshape(-1).view(np.uint8)
    for start in range(0, data.size, _READ_BYTES):
      piece = data[start:start + _READ_BYTES]
      if f.readinto(piece) != piece.size:
        raise UserError(f"{zf.filename}:{key} ends before its {shape} array does; expected a "
                        "complete numpy.savez file")
    return out


def load_idx(folder: str | os.PathLike) -> Dataset:
  """The four official MNIST/Fashion-MNIST idx files in ``folder`` (gzipped or not)."""
  from cnnjax.data import idx
  splits = idx.load_idx_folder(folder)
  train, test = (checked_arrays(f"{folder}:{s}", *splits[s]) for s in ("train", "test"))
  return Dataset(train, test, [str(i) for i in range(int(train[1].max(initial=0)) + 1)])


def load_tfds(name: str, data_dir: str | None) -> Dataset:
  """A TFDS dataset as array_record, read TensorFlow-free (``tfds.data_source``); ours are
  prepared on first use, except ``mnist``, read from ``MNIST_DIR`` when TFDS has no copy."""
  from cnnjax.data import tfds_data
  try:
    arrays = tfds_data.load_arrays(name, data_dir=data_dir, download=name != "mnist")
  except tfds_data.NotPreparedError:
    if name != "mnist":
      raise
    return dataclasses.replace(load_idx(MNIST_DIR), origin=(
        f"the official files shipped in {MNIST_DIR} (no TFDS copy in "
        f"{tfds_data.data_dir_or_default(data_dir)})"))
  train, test = (checked_arrays(f"tfds:{name}:{s}", *arrays[s]) for s in ("train", "test"))
  return Dataset(train, test, list(arrays["class_names"]),
                 origin=f"TFDS in {tfds_data.data_dir_or_default(data_dir)}")


def load_image_folders(root: str | os.PathLike, image_size: int) -> Dataset:
  """An image folder, decoded into memory at ``image_size`` (short side resized, center crop).

  ``root`` holds either ``train/`` and ``val/`` (or ``validation/``) and/or ``test/``, each
  of class folders, or the class folders alone. ``val/`` is the validation split and
  ``test/`` the test split; without ``test/``, ``val/`` is both (as in PyTorch's transfer
  learning tutorial), and without either the test split is left empty, so the validation
  split taken off the training images (``data.val_size``) is also the test split (Keras'
  ``validation_split``).
  """
  from cnnjax.data import folders
  if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
    raise UserError(f"image folder {root} needs data.image_size > 0 (the side the images are "
                    f"resized and cropped to); got {image_size!r}")
  roots = folders.split_roots(root) or {"train": pathlib.Path(root)}
  splits, names = {}, None
  for split, folder in roots.items():
    images, labels, classes = folders.load_image_folder(folder, image_size)
    if names is not None and classes != names:
      raise UserError(f"{folder} has classes {classes}; expected those of {roots['train']}: "
                      f"{names}")
    splits[split], names = (images, labels), classes
  empty = (np.zeros((0, image_size, image_size, 3), np.uint8), np.zeros(0, np.int64))
  test = splits.get("test", splits.get("val", empty))
  return Dataset(splits["train"], test, names, val=splits.get("val"))


def load_tiny_imagenet(path: str | os.PathLike | None, data_dir: str | None = None) -> Dataset:
  """Tiny ImageNet from its zip or unzipped folder ``path``; None: the copy in
  ``<data_dir>/downloads/``, downloaded on first use (see ``cnnjax.data.tiny_imagenet``)."""
  from cnnjax.data import tiny_imagenet
  if path is None:
    from cnnjax.data import tfds_data
    path = tiny_imagenet.download(tfds_data.data_dir_or_default(data_dir))
  splits, class_names = tiny_imagenet.read(path)
  train, val = (checked_arrays(f"{path}:{s}", *splits[s]) for s in ("train", "val"))
  return Dataset(train, val, class_names, val=val, origin=str(path))


def load(source: str, data_dir: str | None = None, image_size: int | None = None,
         limit: int = 0) -> Dataset:
  """Dispatches on ``source``: Tiny ImageNet (``tiny_imagenet``, its ``.zip`` or unzipped
  folder; see ``load_tiny_imagenet``), an ``.npz`` file, a folder of idx files, an image folder
  (a folder with sub-folders; see ``load_image_folders``, which uses ``image_size``), or a
  TFDS name. ``limit`` > 0: the first ``limit`` examples of each split (an .npz reads only
  those; other sources are cut by ``Dataset.head``).

  Anything that looks like a path (has a separator or a file suffix) must exist; any
  other string is taken as a TFDS dataset name (see ``load_tfds``: ``cifar10`` is
  downloaded on first use, ``mnist`` works offline).
  """
  data = _load(source, data_dir, image_size, limit)
  return data.head(limit) if limit else data


def _load(source: str, data_dir: str | None, image_size: int | None, limit: int) -> Dataset:
  """``load``'s dispatch."""
  from cnnjax.data import tiny_imagenet
  path = pathlib.Path(os.path.expanduser(source))
  if source == "tiny_imagenet":
    return load_tiny_imagenet(None, data_dir)
  if tiny_imagenet.is_tiny_imagenet(path):
    return load_tiny_imagenet(path)
  if path.is_file():
    return load_npz(path, limit)
  if path.is_dir() and any(p.is_dir() and not p.name.startswith(".") for p in path.iterdir()):
    return load_image_folders(path, image_size)
  if path.is_dir():
    return load_idx(path)
  if os.sep in source or path.suffix:
    raise UserError(f"data file {path.absolute()} not found; expected an .npz with "
                    f"{list(NPZ_KEYS)}, a folder of idx files or an image folder (offline, "
                    "point --config.data.source at local data)")
  return load_tfds(source, data_dir)
