"""Tiny ImageNet (cs231n): 200 classes of 64x64 RGB images, 500 train and 50 val per class.

Read from the official ``tiny-imagenet-200.zip`` (or the folder it unzips to) without
unpacking: ``train/<wnid>/images/*.JPEG``, ``val/images/*.JPEG`` labelled by
``val/val_annotations.txt``, the classes in ``wnids.txt`` (labels follow the sorted wnids,
as an ``ImageFolder`` over ``train/`` numbers them) and their names from ``words.txt``.
The test images have no published labels, so the official val split is both the
validation and the test split (as the R notebook's ``split = "val"``). The name
``tiny_imagenet`` downloads the zip on first use into ``<data dir>/downloads/``.
"""
import io
import os
import pathlib
import urllib.request
import zipfile
from collections.abc import Iterator

import numpy as np
from PIL import Image

from cnnjax import progress
from cnnjax.errors import UserError

URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
ZIP_NAME = "tiny-imagenet-200.zip"
IMAGE_SHAPE = (64, 64, 3)


class _Archive:
  """The files of the dataset's root (the folder holding ``wnids.txt``) in a zip or a folder."""

  def __init__(self, path: pathlib.Path):
    self.path = path
    if path.is_dir():
      roots = [p.parent for p in (path / "wnids.txt", path / "tiny-imagenet-200" / "wnids.txt")
               if p.is_file()]
      if not roots:
        raise UserError(f"{path}: no wnids.txt in it or in tiny-imagenet-200/; expected the "
                        f"unzipped {ZIP_NAME}")
      root = roots[0]
      self.names = [p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()]
      self._read = lambda name: (root / name).read_bytes()
      return
    try:
      zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
      raise UserError(f"{path}: not a readable zip ({e}); expected the official {ZIP_NAME} "
                      f"from {URL}") from None
    prefixes = [n[:-len("wnids.txt")] for n in zf.namelist() if n.endswith("wnids.txt")]
    if not prefixes:
      raise UserError(f"{path}: no wnids.txt inside; expected the official {ZIP_NAME}")
    prefix = min(prefixes, key=len)
    self.names = [n[len(prefix):] for n in zf.namelist()
                  if n.startswith(prefix) and not n.endswith("/")]
    self._read = lambda name: zf.read(prefix + name)

  def text(self, name: str) -> list[str]:
    try:
      return self._read(name).decode().splitlines()
    except (KeyError, FileNotFoundError):
      raise UserError(f"{self.path}: no {name}; expected the official layout of "
                      f"{ZIP_NAME}") from None

  def image(self, name: str) -> np.ndarray:
    try:
      with Image.open(io.BytesIO(self._read(name))) as img:
        image = np.asarray(img.convert("RGB"))
    except OSError as e:
      raise UserError(f"{self.path}:{name}: cannot decode it ({e})") from None
    if image.shape != IMAGE_SHAPE:
      raise UserError(f"{self.path}:{name}: image of shape {image.shape}; expected "
                      f"{IMAGE_SHAPE}")
    return image


def _decode(archive: _Archive, names: list[str], labels: list[int],
            split: str) -> tuple[np.ndarray, np.ndarray]:
  images = np.empty((len(names), *IMAGE_SHAPE), np.uint8)
  for i, name in enumerate(progress.bar(names, len(names), f"Tiny ImageNet {split}")):
    images[i] = archive.image(name)
  return images, np.asarray(labels, np.int64)


def read(path: str | os.PathLike) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], list[str]]:
  """``({'train': (images, labels), 'val': ...}, class_names)`` from the zip or folder ``path``:
  images uint8 ``[N, 64, 64, 3]``, labels int64 ``[N]`` indexing the sorted wnids."""
  archive = _Archive(pathlib.Path(path))
  wnids = sorted(w.strip() for w in archive.text("wnids.txt") if w.strip())
  label_of = {w: i for i, w in enumerate(wnids)}
  words = dict(line.split("\t", 1) for line in archive.text("words.txt") if "\t" in line)
  class_names = [words.get(w, w).split(",")[0].strip() for w in wnids]
  train = sorted(n for n in archive.names
                 if n.startswith("train/") and n.endswith(".JPEG") and "/images/" in n)
  unknown = sorted({n.split("/")[1] for n in train} - label_of.keys())
  if unknown:
    raise UserError(f"{path}: train/ has classes {unknown[:3]} that wnids.txt does not list")
  splits = {"train": _decode(archive, train, [label_of[n.split("/")[1]] for n in train],
                             "train")}
  val = []
  for line in archive.text("val/val_annotations.txt"):
    fields = line.split("\t")
    if len(fields) >= 2:
      if fields[1] not in label_of:
        raise UserError(f"{path}: val/val_annotations.txt labels {fields[0]} with "
                        f"{fields[1]!r}, which wnids.txt does not list")
      val.append((f"val/images/{fields[0]}", label_of[fields[1]]))
  val.sort()
  splits["val"] = _decode(archive, [n for n, _ in val], [y for _, y in val], "val")
  for split, (images, _) in splits.items():
    if not len(images):
      raise UserError(f"{path}: no {split} images; expected the official layout of {ZIP_NAME}")
  return splits, class_names


def download(data_dir: pathlib.Path) -> pathlib.Path:
  """``data_dir/downloads/tiny-imagenet-200.zip``, downloaded (248 MB, with a progress bar)
  if it is not there; the partial file is removed if the download fails."""
  from cnnjax.data import tfds_builders  # its reachability probe: seconds, not tfds' minutes
  target = data_dir / "downloads" / ZIP_NAME
  if target.is_file():
    return target
  if reason := tfds_builders._unreachable(URL):
    raise UserError(
        f"cannot download Tiny ImageNet from {URL} ({reason}); offline, pass a local copy of "
        f"the zip or the folder it unzips to (--config.data.source=/path/{ZIP_NAME})")
  target.parent.mkdir(parents=True, exist_ok=True)
  partial = target.with_suffix(".zip.part")
  try:
    with urllib.request.urlopen(URL, timeout=60) as response, open(partial, "wb") as f:
      total = int(response.headers.get("Content-Length") or 0)
      bar = progress.Progress(total, f"Downloading {URL}")
      for chunk in _chunks(response):
        f.write(chunk)
        bar.update(len(chunk))
      bar.close()
    os.replace(partial, target)
  except OSError as e:
    raise UserError(f"download of {URL} failed ({type(e).__name__}: {e}); run again, or pass "
                    f"a local copy (--config.data.source=/path/{ZIP_NAME})") from None
  finally:
    if partial.exists():
      partial.unlink()
  return target


def _chunks(response, size: int = 1 << 20) -> Iterator[bytes]:
  while chunk := response.read(size):
    yield chunk


def is_tiny_imagenet(path: pathlib.Path) -> bool:
  """Whether ``path`` is a ``.zip`` or a folder holding (``tiny-imagenet-200/``)``wnids.txt``."""
  return (path.suffix.lower() == ".zip" and path.is_file()) or (path.is_dir() and any(
      (p / "wnids.txt").is_file() for p in (path, path / "tiny-imagenet-200")))
