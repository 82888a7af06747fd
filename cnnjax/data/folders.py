"""Image folders ``root/<class>/*.{jpg,jpeg,png,bmp}``, like torchvision's ``ImageFolder``.

Class indices follow the sorted class folder names; files are sorted within a class and
found recursively. Names starting with ``.`` (``.ipynb_checkpoints``, macOS ``._x.jpg``)
are ignored. Images are decoded with Pillow to RGB uint8 ``[H, W, 3]``; they may differ in
size, so the resizing helpers here work on one image at a time and follow torchvision's
``Resize`` + ``CenterCrop`` and ``RandomResizedCrop`` (bilinear, on PIL images).
"""
import math
import os
import pathlib
import warnings

import numpy as np
from PIL import Image

from cnnjax.errors import UserError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")
_EVAL_SPLITS = {"val": ("val", "validation"), "test": ("test",)}


def _image_files(class_dir: pathlib.Path) -> list[pathlib.Path]:
  """Image files under ``class_dir`` (recursively), sorted, hidden files and folders left out."""
  return sorted(
      p for p in class_dir.rglob("*")
      if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
      and not any(part.startswith(".") for part in p.relative_to(class_dir).parts))


def _readable(path: pathlib.Path) -> bool:
  """Whether Pillow recognises ``path`` and its cheap integrity check passes; warns if not."""
  try:
    with Image.open(path) as img:
      img.verify()
    return True
  except Exception as e:  # pylint: disable=broad-except  # Pillow raises many kinds.
    warnings.warn(f"skipping {path}: Pillow cannot read it ({e})", stacklevel=2)
    return False


def _decode_rgb(path: str) -> np.ndarray:
  """Decodes ``path`` to RGB uint8 ``[H, W, 3]``; Pillow's errors propagate."""
  with Image.open(path) as img:
    return np.array(img.convert("RGB"))


class ImageFolder:
  """Random-access source over ``root/<class>/<image>``, e.g. for ``grain.MapDataset.source``.

  Every file is opened and checked with Pillow's ``verify()`` when the folder is scanned;
  those that fail are skipped with a warning naming them, so indices and labels stay fixed
  afterwards. ``verify()`` does not decode JPEG data: a truncated JPEG passes the scan and
  ``__getitem__`` then raises ``UserError`` naming it.

  Attributes:
    root: the folder scanned.
    class_names: sorted class folder names; a label is an index into this list.
    paths: the N file paths (str), sorted by class then by path.
    labels: ``[N]`` int64 class indices of ``paths``.
  """

  def __init__(self, root: str | os.PathLike):
    self.root = pathlib.Path(root)
    if not self.root.is_dir():
      raise UserError(f"{self.root}: not a directory (expected root/<class>/<image> files)")
    class_dirs = sorted(p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
      raise UserError(f"{self.root}: no class sub-folders (expected root/<class>/<image>)")
    self.class_names = [d.name for d in class_dirs]
    paths, labels = [], []
    for label, class_dir in enumerate(class_dirs):
      files = [p for p in _image_files(class_dir) if _readable(p)]
      if not files:
        warnings.warn(f"class folder {class_dir} has no readable images "
                      f"({', '.join(IMAGE_EXTENSIONS)}); class {label} gets no examples",
                      stacklevel=2)
      paths += [str(p) for p in files]
      labels += [label] * len(files)
    if not paths:
      raise UserError(f"{self.root}: no readable images ({', '.join(IMAGE_EXTENSIONS)}) in "
                      f"its class folders {self.class_names}")
    self.paths = paths
    self.labels = np.asarray(labels, np.int64)

  def __len__(self) -> int:
    return len(self.paths)

  def __getitem__(self, index: int) -> dict[str, np.ndarray | int]:
    """Returns ``{'image': uint8 [H, W, 3] RGB, 'label': int}`` of example ``index``."""
    path = self.paths[index]
    try:
      image = _decode_rgb(path)
    except OSError as e:
      raise UserError(f"{path}: cannot decode image ({e}); delete or replace the file") from None
    return {"image": image, "label": int(self.labels[index])}


def split_roots(root: str | os.PathLike) -> dict[str, pathlib.Path]:
  """Finds the split sub-roots of ``root``: ``train/`` and ``val/`` (or ``validation/``), ``test/``.

  Returns:
    ``{'train': root/train, 'val': root/val or root/validation, 'test': root/test}`` with
    only the eval splits present; ``{}`` when ``root`` has no ``train/`` folder, i.e. it is
    one image folder that the caller splits itself.
  Raises:
    UserError: ``root`` is not a directory, or has both ``val/`` and ``validation/``.
  """
  root = pathlib.Path(root)
  if not root.is_dir():
    raise UserError(f"{root}: not a directory (expected an image folder)")
  if not (root / "train").is_dir():
    return {}
  roots = {"train": root / "train"}
  for split, names in _EVAL_SPLITS.items():
    found = [root / n for n in names if (root / n).is_dir()]
    if len(found) > 1:
      raise UserError(f"{root}: has both {' and '.join(map(str, found))}; expected one")
    if found:
      roots[split] = found[0]
  return roots


def _to_pil(image: np.ndarray) -> Image.Image:
  """Wraps a uint8 ``[H, W, 3]`` image for Pillow; raises ValueError on another array."""
  if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
    raise ValueError(f"expected a uint8 [H, W, 3] image, got {image.dtype} {image.shape}")
  return Image.fromarray(image)


def resize_center_crop(image: np.ndarray, size: int, resize: int | None = None) -> np.ndarray:
  """Resizes the short side to ``resize`` then center crops ``size x size``.

  The same as torchvision's ``Resize(resize)`` + ``CenterCrop(size)`` on a PIL image:
  bilinear with antialiasing, the long side rounded down, the crop offset rounded.

  Args:
    image: uint8 ``[H, W, 3]``.
    size: side of the output.
    resize: short side after resizing, at least ``size``; ``None`` means ``size``
      (the whole short side is kept).
  Returns:
    uint8 ``[size, size, 3]``.
  Raises:
    UserError: ``size`` < 1 or ``resize`` < ``size``.
  """
  resize = size if resize is None else resize
  if size < 1 or resize < size:
    raise UserError(f"resize_center_crop: size={size}, resize={resize}; expected "
                    "1 <= size <= resize")
  img = _to_pil(image)
  w, h = img.size
  if w <= h:
    new_w, new_h = resize, int(resize * h / w)
  else:
    new_w, new_h = int(resize * w / h), resize
  if (new_w, new_h) != (w, h):
    img = img.resize((new_w, new_h), Image.Resampling.BILINEAR)
  top = int(round((new_h - size) / 2.0))
  left = int(round((new_w - size) / 2.0))
  return np.array(img.crop((left, top, left + size, top + size)))


def random_resized_crop(image: np.ndarray, size: int, rng: np.random.Generator,
                        scale: tuple[float, float] = (0.08, 1.0),
                        ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> np.ndarray:
  """Crops a random area and aspect ratio, resized to ``size x size``.

  torchvision's ``RandomResizedCrop`` algorithm: up to 10 tries of an area fraction
  uniform in ``scale`` and an aspect ratio (width / height) log-uniform in ``ratio``;
  if none fits, the largest center crop whose ratio is within ``ratio``.

  Args:
    image: uint8 ``[H, W, 3]``.
    size: side of the output.
    rng: source of the crop; the same state gives the same crop.
    scale: range of the crop area as a fraction of the image area.
    ratio: range of the crop's width / height.
  Returns:
    uint8 ``[size, size, 3]``.
  Raises:
    UserError: ``size`` < 1 or an empty or negative ``scale`` / ``ratio`` range.
  """
  if size < 1 or not 0 < scale[0] <= scale[1] or not 0 < ratio[0] <= ratio[1]:
    raise UserError(f"random_resized_crop: size={size}, scale={scale}, ratio={ratio}; "
                    "expected size >= 1 and 0 < low <= high for scale and ratio")
  img = _to_pil(image)
  width, height = img.size
  top, left, h, w = _crop_box(height, width, rng, scale, ratio)
  img = img.crop((left, top, left + w, top + h))
  return np.array(img.resize((size, size), Image.Resampling.BILINEAR))


def _crop_box(height: int, width: int, rng: np.random.Generator,
              scale: tuple[float, float],
              ratio: tuple[float, float]) -> tuple[int, int, int, int]:
  """``(top, left, h, w)`` of a random resized crop, as torchvision's ``get_params``."""
  area = height * width
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(10):
    target_area = area * rng.uniform(scale[0], scale[1])
    aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
    w = int(round(math.sqrt(target_area * aspect)))
    h = int(round(math.sqrt(target_area / aspect)))
    if 0 < w <= width and 0 < h <= height:
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      return top, left, h, w
  in_ratio = width / height
  if in_ratio < ratio[0]:
    w, h = width, int(round(width / ratio[0]))
  elif in_ratio > ratio[1]:
    w, h = int(round(height * ratio[1])), height
  else:
    w, h = width, height
  return (height - h) // 2, (width - w) // 2, h, w


def load_image_folder(root: str | os.PathLike, size: int,
                      resize: int | None = None) -> tuple[np.ndarray, np.ndarray, list[str]]:
  """Decodes a whole image folder into memory, each image resized and center cropped.

  For small folders (e.g. hymenoptera: 244 train / 153 val images). Files that the scan
  accepts but that fail to decode (e.g. truncated JPEGs) are skipped with a warning.

  Args:
    root: ``root/<class>/<image>`` folder.
    size: side of the output images.
    resize: short side before the center crop (see ``resize_center_crop``).
  Returns:
    ``(images [N, size, size, 3] uint8, labels [N] int64, class_names)``.
  Raises:
    UserError: as ``ImageFolder``, or no image of ``root`` decodes.
  """
  folder = ImageFolder(root)
  images, labels = [], []
  for path, label in zip(folder.paths, folder.labels):
    try:
      image = _decode_rgb(path)
    except OSError as e:
      warnings.warn(f"skipping {path}: cannot decode image ({e})", stacklevel=2)
      continue
    images.append(resize_center_crop(image, size, resize))
    labels.append(label)
  if not images:
    raise UserError(f"{root}: none of its {len(folder)} images could be decoded")
  return np.stack(images), np.asarray(labels, np.int64), folder.class_names
