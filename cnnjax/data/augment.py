"""Batch-level image augmentation in numpy.

Every function takes a uint8 batch ``images [B, H, W, C]`` and a ``np.random.Generator``
and returns a new batch of the same shape and dtype; the same generator state gives the
same result. Working on whole batches in-process was measured ~5x faster than per-record
transforms on 2 CPU cores (../shared/DESIGN.md).
"""
import numpy as np


def random_crop(images: np.ndarray, rng: np.random.Generator, padding: int) -> np.ndarray:
  """Zero-pads each side by ``padding`` and crops back to ``[H, W]`` at a random offset.

  Args:
    images: ``[B, H, W, C]``.
    rng: source of the per-image offsets.
    padding: pixels added on each side; 0 returns the batch unchanged.
  Returns:
    ``[B, H, W, C]``, each image shifted by up to ``padding`` pixels in each direction.
  """
  if padding == 0:
    return images
  b, h, w, _ = images.shape
  padded = np.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
  dy = rng.integers(0, 2 * padding + 1, size=b)
  dx = rng.integers(0, 2 * padding + 1, size=b)
  rows = dy[:, None] + np.arange(h)[None, :]  # [B, H]
  cols = dx[:, None] + np.arange(w)[None, :]  # [B, W]
  return padded[np.arange(b)[:, None, None], rows[:, :, None], cols[:, None, :]]


def random_flip(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """Mirrors each image left-right with probability 1/2. ``[B, H, W, C]`` in and out."""
  flip = rng.random(images.shape[0]) < 0.5
  out = images.copy()
  out[flip] = images[flip, :, ::-1]
  return out
