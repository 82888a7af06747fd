"""From data to batches: validation split, normalisation statistics, grain pipelines for
training (shuffled per epoch, augmented, drop-remainder; from in-memory arrays or decoded
per record from an image folder) and evaluation (every example once, last batch padded and
masked), and the iterator that prepares batches ahead in threads or worker processes.

A batch is a dict of numpy arrays: ``image`` uint8 ``[B, H, W, C]``, ``label`` int64 ``[B]``
and, for evaluation, ``mask`` bool ``[B]`` (False on padding). Normalisation happens on
the device, inside the compiled step, so batches stay uint8 (4x less to copy).
"""
import functools
from typing import Callable, Iterator

import grain
import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from cnnjax.data.folders import ImageFolder, random_resized_crop
from cnnjax.data.sources import Arrays
from cnnjax.errors import UserError

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
    order within each part, so the split is a fixed, inspectable subset. With no validation
    examples the training part is ``images`` and ``labels`` themselves, not copies.
  """
  n = len(images)
  count = int(round(val_size * n)) if 0 < val_size < 1 else int(val_size)
  if not 0 <= count < n:
    raise UserError(f"data.val_size={val_size} leaves no training data; expected 0 <= val_size < {n}")
  if not count:  # the arrays themselves: a masked copy of them took a second for CIFAR-10
    return (images, labels), (images[:0], labels[:0])
  is_val = np.zeros(n, bool)
  is_val[np.random.default_rng(seed).permutation(n)[:count]] = True
  return (images[~is_val], labels[~is_val]), (images[is_val], labels[is_val])


_EXACT_PIXELS = (2**31 - 1) // 255**2  # uint8 pixels whose squares an int32 sum holds exactly
_CHUNK_BYTES = 1 << 26  # bytes of images per device call in channel_stats


@functools.partial(jax.jit, static_argnums=1)
def _pixel_sums(chunk: jax.Array, group: int) -> tuple[jax.Array, jax.Array]:
  """Integer sums of values and squares over each run of ``group`` pixels of uint8 ``chunk``
  ``[B, H, W, C]``: two int32 ``[B * H * W / group, C]``."""
  v = chunk.reshape(-1, group, chunk.shape[-1]).astype(jnp.int32)
  return v.sum(1), (v * v).sum(1)


def channel_stats(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Per-channel mean and std of uint8 ``[N, H, W, C]`` images, in pixel units ``[C]``.

  Exact: integer sums per image (per row for images of more than ``_EXACT_PIXELS`` pixels)
  on the device, in chunks of ``_CHUNK_BYTES`` (the last zero-padded: one compiled shape),
  added in float64 on the host; a float64 copy of the images on the host took 5-10x
  longer."""
  n, h, w, c = images.shape
  group = h * w if h * w <= _EXACT_PIXELS else (w if w <= _EXACT_PIXELS else 1)
  size = min(n, max(1, _CHUNK_BYTES // (h * w * c)))
  total = np.zeros((2, c))
  for start in range(0, n, size):
    chunk = images[start:start + size]
    if len(chunk) < size:
      chunk = np.concatenate([chunk, np.zeros((size - len(chunk), h, w, c), np.uint8)])
    values, squares = _pixel_sums(chunk, group)
    total += np.asarray(values, np.float64).sum(0), np.asarray(squares, np.float64).sum(0)
  mean, square = total / (n * h * w)
  std = np.sqrt(np.maximum(square - mean ** 2, 0.0))
  return mean.astype(np.float32), std.astype(np.float32)


# Pixel-unit (mean, std) per channel of the pretrained weights' normalisation.
PRETRAINED_STATS = {
    "imagenet": ((123.675, 116.28, 103.53), (58.395, 57.12, 57.375)),  # torchvision models
    "lite": ((127.0,) * 3, (128.0,) * 3),  # EfficientNet-Lite: (pixel - 127) / 128
}
NORMALIZATIONS = ("dataset", "unit", *PRETRAINED_STATS)


def normalization_stats(name: str, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """``(mean, std)`` ``[C]`` in pixel units for ``(pixel - mean) / std``.

  Args:
    name: 'dataset' (``channel_stats(images)``), 'unit' (pixel / 255), 'imagenet' (torchvision's ImageNet
      models: mean 255 * (0.485, 0.456, 0.406), std 255 * (0.229, 0.224, 0.225)) or 'lite'
      (EfficientNet-Lite: 127 and 128).
    images: the training images, uint8 ``[N, H, W, C]``.
  """
  if name == "dataset":
    return channel_stats(images)
  if name == "unit":
    channels = images.shape[-1]
    return np.zeros(channels, np.float32), np.full(channels, 255.0, np.float32)
  if name not in PRETRAINED_STATS:
    raise UserError(f"unknown data.normalization {name!r}; expected one of {list(NORMALIZATIONS)}")
  if images.shape[-1] != 3:
    raise UserError(f"data.normalization={name!r} is for RGB images; these have "
                    f"{images.shape[-1]} channel(s), expected 3")
  mean, std = PRETRAINED_STATS[name]
  return np.asarray(mean, np.float32), np.asarray(std, np.float32)


def epoch_seed(seed: int, epoch: int) -> int:
  """A 32-bit seed for one epoch's shuffle and augmentation, derived from the run seed."""
  return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])


def _epoch_batches(num_examples: int, batch_size: int, seed: int, epoch: int,
                   shard: tuple[int, int],
                   load: Callable[[np.ndarray, np.random.Generator], dict[str, np.ndarray]]
                   ) -> grain.MapDataset:
  """The shuffled, drop-remainder batches of one epoch, each built by ``load``.

  Args:
    num_examples: ``N``, the examples indexed ``0..N-1``.
    batch_size: the global batch size.
    seed, epoch: select the permutation and each batch's generator.
    shard: ``(index, count)``: this process's slice of every global batch.
    load: ``load(ids, rng) -> batch`` for this process's sorted example ids ``[b]``.
  Returns:
    ``N // batch_size`` batches; batch ``k`` depends only on ``(seed, epoch, k)``. The
    examples of a global batch do not depend on the process count; the random draws in
    ``load`` (augmentation) do, as each process draws its own.
  """
  if batch_size > num_examples:
    raise UserError(f"batch_size={batch_size} is larger than the {num_examples} training examples")
  index, count = shard
  if batch_size % count:
    raise UserError(f"batch_size={batch_size} does not divide into {count} processes")
  local = batch_size // count

  def make_batch(ids: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
    # Sorted (faster reads) before slicing: the global batch is the same for any process count.
    ids = np.sort(ids)[index * local:(index + 1) * local]
    if count > 1:  # each process its own draws, not a copy of process 0's
      rng = np.random.default_rng([int(rng.integers(2**32)), index])
    return load(ids, rng)

  s = epoch_seed(seed, epoch)

  def batch_ids(k: int) -> np.ndarray:
    # Batch k of grain's MapDataset.range(N).shuffle(seed=s).batch(batch_size), the same ids
    # without its per-example Python (a third of the host's time per batch).
    return np.array([grain.experimental.index_shuffle(i, max_index=num_examples - 1, seed=s,
                                                      rounds=4)
                     for i in range(k * batch_size, (k + 1) * batch_size)])

  ds = grain.MapDataset.range(num_examples // batch_size).map(batch_ids)
  return ds.random_map(make_batch, seed=s)


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

  def load(ids: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
    batch_images = images[ids]
    if augment is not None:
      batch_images = augment(batch_images, rng)
    return {"image": batch_images, "label": labels[ids]}

  return _epoch_batches(len(images), batch_size, seed, epoch, shard, load)


def folder_epoch(folder: ImageFolder, batch_size: int, seed: int, epoch: int, image_size: int,
                 augment: BatchAugment | None = None,
                 shard: tuple[int, int] = (0, 1)) -> grain.MapDataset:
  """One epoch of training batches decoded from an image folder, for folders too big for memory.

  Each record of a batch is decoded and random-resized-cropped (torchvision's
  ``RandomResizedCrop``) to ``image_size``; then ``augment`` runs on the stacked batch (e.g.
  ``KerasAugment(horizontal_flip=True)``). As with ``train_epoch``, batch ``k`` depends only
  on ``(seed, epoch, k)`` and ``folder_epoch(...)[k:]`` resumes mid-epoch; the dataset
  pickles small (paths and labels), so worker processes (``prefetch(ds, workers=n)``) can
  decode batches in parallel.

  Args:
    folder: the random-access image folder.
    batch_size: the global batch size; the remainder of the epoch is dropped.
    seed, epoch: select the permutation, the crops and the augmentation draws.
    image_size: side ``S`` of the square crops.
    augment: batch-level augmentation ``f(images, rng) -> images`` after the crops.
    shard: ``(index, count)``: this process's slice of every global batch (multi-host).
  Returns:
    A ``grain.MapDataset`` of ``len(folder) // batch_size`` batches: ``image`` uint8
    ``[batch_size // count, S, S, 3]``, ``label`` int64 ``[batch_size // count]``.
  """
  def load(ids: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
    images = np.stack([random_resized_crop(folder[i]["image"], image_size, rng) for i in ids])
    if augment is not None:
      images = augment(images, rng)
    return {"image": images, "label": folder.labels[ids]}

  return _epoch_batches(len(folder), batch_size, seed, epoch, shard, load)


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


def prefetch(ds: grain.MapDataset, buffer: int = 4,
             workers: int = 0) -> Iterator[dict[str, np.ndarray]]:
  """Iterates ``ds`` in order, preparing the next batches in the background.

  With ``workers=0`` a background thread of this process prepares up to ``buffer`` batches
  ahead (the fastest choice for batch-level numpy augmentation of in-memory data, see
  BENCHMARKS.md). With ``workers=n`` grain spawns ``n`` worker processes, each preparing
  every n-th batch (up to ``buffer`` ahead each); the order and the batches are the same
  as in-process. The workers start when the first batch is requested: each receives a
  pickled copy of ``ds`` (including in-memory arrays it holds) and imports its modules,
  which takes seconds, once per call. They stop when the iteration ends or the returned
  iterator is closed or dropped (e.g. after a ``break``).

  Spawned workers re-import the ``__main__`` module: a script using workers needs an
  ``if __name__ == "__main__":`` guard. absl flags are marked as parsed (grain's workers
  read its flags) if no ``app.run`` has parsed them.

  Args:
    ds: random-access batches, e.g. ``train_epoch(...)[k:]``.
    buffer: batches prepared ahead (per worker when ``workers > 0``), >= 1.
    workers: 0 for a thread in this process, else the number of worker processes.
  Returns:
    An iterator over the batches of ``ds``.
  """
  if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
    raise UserError(f"data.workers={workers!r}; expected 0 (in-process) or a number of worker processes")
  if isinstance(buffer, bool) or not isinstance(buffer, int) or buffer < 1:
    raise UserError(f"prefetch buffer={buffer!r}; expected a positive number of batches")
  batches = ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=buffer))
  if workers:
    # grain's worker processes read absl's global FLAGS; cnnjax's commands keep their own
    # FlagValues (experiments.entry), so this only matters to a caller that never parses.
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    batches = batches.mp_prefetch(
        grain.MultiprocessingOptions(num_workers=workers, per_worker_buffer_size=buffer))
  return _closing(iter(batches))


def _closing(it: grain.DatasetIterator) -> Iterator[dict[str, np.ndarray]]:
  """Yields from ``it`` and closes it (stopping threads and worker processes) when the
  iteration ends or this generator is closed or garbage collected."""
  try:
    yield from it
  finally:
    it.close()
