"""From in-memory arrays to batches: validation split, normalisation statistics, grain
pipelines for training (shuffled per epoch, augmented, drop-remainder) and evaluation
(every example once, last batch padded and masked).

A batch is a dict of numpy arrays: ``image`` uint8 ``[B, H, W, C]``, ``label`` int64 ``[B]``
and, for evaluation, ``mask`` bool ``[B]`` (False on padding). Normalisation happens on
the device, inside the compiled step, so batches stay uint8 (4x less to copy).
"""
from typing import Callable, Iterator

import grain
import numpy as np

from cnnjax.errors import UserError

Arrays = tuple[np.ndarray, np.ndarray]  # images [N, H, W, C] uint8, labels [N] int64
BatchAugment = Callable[[np.ndarray, np.random.Generator], np.ndarray]


def split_validation(images: np.ndarray, labels: np.ndarray, val_size: int | float,
                     seed: int) -> tuple[Arrays, Arrays]:
  """Seeded random split of a training set into (train, validation).

  Args:
    images: ``[N, H, W, C]``.
    labels: ``[N]``.
    val_size: number of validation examples, or a fraction of N if < 1.
    seed: the permutation's seed.
  Returns:
    ``((train_images, train_labels), (val_images, val_labels))``; both keep the original
    order within each part, so the split is a fixed, inspectable subset.
  """
  n = len(images)
  count = int(round(val_size * n)) if 0 < val_size < 1 else int(val_size)
  if not 0 <= count < n:
    raise UserError(f"data.val_size={val_size} leaves no training data; expected 0 <= val_size < {n}")
  is_val = np.zeros(n, bool)
  is_val[np.random.default_rng(seed).permutation(n)[:count]] = True
  return (images[~is_val], labels[~is_val]), (images[is_val], labels[is_val])


def channel_stats(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Per-channel mean and std of uint8 ``[N, H, W, C]`` images, in pixel units ``[C]``."""
  flat = images.reshape(-1, images.shape[-1])
  total = np.zeros(flat.shape[1]), np.zeros(flat.shape[1])
  for start in range(0, len(flat), 1 << 22):  # float64 sums in chunks: exact and bounded memory
    chunk = flat[start:start + (1 << 22)].astype(np.float64)
    total = total[0] + chunk.sum(0), total[1] + (chunk ** 2).sum(0)
  mean = total[0] / len(flat)
  std = np.sqrt(total[1] / len(flat) - mean ** 2)
  return mean.astype(np.float32), std.astype(np.float32)


def epoch_seed(seed: int, epoch: int) -> int:
  """A 32-bit seed for one epoch's shuffle and augmentation, derived from the run seed."""
  return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])


def train_epoch(data: Arrays, batch_size: int, seed: int, epoch: int,
                augment: BatchAugment | None = None,
                shard: tuple[int, int] = (0, 1)) -> grain.MapDataset:
  """One epoch of training batches as a random-access grain dataset.

  Batch ``k`` of epoch ``e`` depends only on ``(seed, e, k)``, so a resumed run continues
  with exactly the batch an uninterrupted run would have seen: ``train_epoch(...)[k:]``.

  Args:
    data: ``(images [N, H, W, C] uint8, labels [N])`` in memory.
    batch_size: the global batch size; the remainder of the epoch is dropped.
    seed, epoch: select the permutation and the augmentation draws.
    augment: batch-level augmentation ``f(images, rng) -> images``.
    shard: ``(index, count)``: this process's slice of every global batch (multi-host).
  Returns:
    A ``grain.MapDataset`` of ``N // batch_size`` batches of ``batch_size // count``.
  """
  images, labels = data
  if batch_size > len(images):
    raise UserError(f"batch_size={batch_size} is larger than the {len(images)} training examples")
  index, count = shard
  if batch_size % count:
    raise UserError(f"batch_size={batch_size} does not divide into {count} processes")
  local = batch_size // count

  def make_batch(ids: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
    ids = np.sort(ids[index * local:(index + 1) * local])  # sorted reads are faster
    batch_images = images[ids]
    if augment is not None:
      batch_images = augment(batch_images, rng)
    return {"image": batch_images, "label": labels[ids]}

  s = epoch_seed(seed, epoch)
  ds = grain.MapDataset.range(len(images)).shuffle(seed=s).batch(batch_size, drop_remainder=True)
  return ds.map(np.asarray).random_map(make_batch, seed=s)


def eval_batches(data: Arrays, batch_size: int,
                 shard: tuple[int, int] = (0, 1)) -> Iterator[dict[str, np.ndarray]]:
  """Every example exactly once, in order; the last batch is zero-padded and masked.

  Args:
    data: ``(images [N, H, W, C], labels [N])``.
    batch_size: the global batch size.
    shard: ``(index, count)``: this process's slice of every global batch.
  Yields:
    ``{'image': [b, H, W, C], 'label': [b], 'mask': [b] bool}`` with ``b = batch_size // count``.
  """
  images, labels = data
  index, count = shard
  local = batch_size // count
  for start in range(0, len(images), batch_size):
    lo = min(start + index * local, len(images))
    hi = min(lo + local, start + batch_size, len(images))
    pad = local - (hi - lo)
    batch = {"image": images[lo:hi], "label": labels[lo:hi], "mask": np.ones(hi - lo, bool)}
    if pad:
      batch = {k: np.concatenate([v, np.zeros((pad,) + v.shape[1:], v.dtype)])
               for k, v in batch.items()}
    yield batch


def prefetch(ds: grain.MapDataset, buffer: int = 4) -> Iterator[dict[str, np.ndarray]]:
  """Iterates ``ds`` with background threads preparing the next ``buffer`` batches."""
  options = grain.ReadOptions(num_threads=1, prefetch_buffer_size=buffer)
  return iter(ds.to_iter_dataset(options))
