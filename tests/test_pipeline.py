import multiprocessing
import time

import numpy as np
import pytest
from PIL import Image

from cnnjax.data import pipeline
from cnnjax.data.augment import KerasAugment
from cnnjax.data.folders import ImageFolder
from cnnjax.errors import UserError
from tests.conftest import make_images


def test_split_is_seeded_disjoint_and_complete():
  x, y = make_images(100)
  x[:, 0, 0, 0] = np.arange(100)  # tag each image
  (tx, ty), (vx, vy) = pipeline.split_validation(x, y, 30, seed=3)
  assert len(tx) == 70 and len(vx) == 30
  assert sorted(np.concatenate([tx[:, 0, 0, 0], vx[:, 0, 0, 0]])) == list(range(100))
  (_, _), (vx2, _) = pipeline.split_validation(x, y, 0.3, seed=3)
  np.testing.assert_array_equal(vx, vx2)
  (_, _), (vx3, _) = pipeline.split_validation(x, y, 30, seed=4)
  assert not np.array_equal(vx, vx3)
  with pytest.raises(UserError, match="val_size=100 leaves no training data"):
    pipeline.split_validation(x, y, 100, seed=0)
  (tx0, ty0), (vx0, vy0) = pipeline.split_validation(x, y, 0, seed=0)
  assert tx0 is x and ty0 is y and vx0.shape == (0, *x.shape[1:]) and vy0.shape == (0,)


@pytest.mark.parametrize("chunk_bytes, exact_pixels", [(1 << 26, None), (5000, None), (5000, 9),
                                                       (5000, 3)])
def test_channel_stats_match_numpy(monkeypatch, chunk_bytes, exact_pixels):
  # Small chunks: several, the last padded; small exact_pixels: sums per row, then per pixel.
  monkeypatch.setattr(pipeline, "_CHUNK_BYTES", chunk_bytes)
  if exact_pixels:
    monkeypatch.setattr(pipeline, "_EXACT_PIXELS", exact_pixels)
  x, _ = make_images(50)
  mean, std = pipeline.channel_stats(x)
  flat = x.reshape(-1, 3).astype(np.float64)
  np.testing.assert_allclose(mean, flat.mean(0), rtol=1e-6)
  np.testing.assert_allclose(std, flat.std(0), rtol=1e-6)


def test_channel_stats_exact_at_the_int32_limit():
  x = np.full((2, 1, pipeline._EXACT_PIXELS, 1), 255, np.uint8)  # squares sum to just < 2**31
  x[1, 0, ::2] = 0
  mean, std = pipeline.channel_stats(x)
  flat = x.reshape(-1).astype(np.float64)
  np.testing.assert_allclose(mean, [flat.mean()], rtol=1e-7)
  np.testing.assert_allclose(std, [flat.std()], rtol=1e-7)


def test_train_epoch_is_deterministic_reshuffled_and_drops_remainder():
  x, y = make_images(100)
  x[:, 0, 0, 0] = np.arange(100)
  ds = pipeline.train_epoch((x, y), 32, seed=0, epoch=0)
  assert len(ds) == 3
  ids = np.concatenate([b["image"][:, 0, 0, 0] for b in ds])
  assert len(set(ids)) == 96  # no repeats within an epoch
  again = pipeline.train_epoch((x, y), 32, seed=0, epoch=0)
  np.testing.assert_array_equal(ds[2]["image"], again[2]["image"])
  other = pipeline.train_epoch((x, y), 32, seed=0, epoch=1)
  assert not np.array_equal(ds[0]["image"], other[0]["image"])
  for b in ds:
    np.testing.assert_array_equal(b["label"], y[b["image"][:, 0, 0, 0]])


def test_train_epoch_batches_are_grains_shuffled_batches():
  """The ids of batch k are those of grain's ``range(N).shuffle(seed).batch(B)[k]``: the
  batches (and so a seeded run's results) of the code that used grain's shuffle itself."""
  import grain
  x, y = make_images(100)
  x[:, 0, 0, 0] = np.arange(100)
  for seed, epoch in [(0, 0), (3, 7)]:
    ds = pipeline.train_epoch((x, y), 16, seed=seed, epoch=epoch)
    reference = grain.MapDataset.range(100).shuffle(
        seed=pipeline.epoch_seed(seed, epoch)).batch(16, drop_remainder=True)
    assert len(ds) == len(reference) == 6
    for k in range(6):
      np.testing.assert_array_equal(ds[k]["image"][:, 0, 0, 0], np.sort(reference[k]))


def test_resuming_mid_epoch_gives_the_same_batches():
  x, y = make_images(64)
  flip = lambda images, rng: images[:, :, ::-1] if rng.random() < 0.5 else images
  ds = pipeline.train_epoch((x, y), 8, seed=5, epoch=2, augment=flip)
  full = [b["image"] for b in pipeline.prefetch(ds)]
  resumed = [b["image"] for b in pipeline.prefetch(ds[3:])]
  assert len(resumed) == 5
  for a, b in zip(full[3:], resumed):
    np.testing.assert_array_equal(a, b)


def test_process_shards_partition_each_global_batch():
  x, y = make_images(64)
  x[:, 0, 0, 0] = np.arange(64)
  whole = pipeline.train_epoch((x, y), 16, seed=1, epoch=0)[1]["image"][:, 0, 0, 0]
  parts = [pipeline.train_epoch((x, y), 16, seed=1, epoch=0, shard=(i, 2))[1]["image"][:, 0, 0, 0]
           for i in range(2)]
  assert sorted(np.concatenate(parts)) == sorted(whole)
  with pytest.raises(UserError, match="batch_size=15 does not divide into 2 processes"):
    pipeline.train_epoch((x, y), 15, seed=1, epoch=0, shard=(0, 2))


def test_eval_batches_see_every_example_once_with_padding_masked():
  x, y = make_images(70)
  batches = list(pipeline.eval_batches((x, y), 32))
  assert [len(b["label"]) for b in batches] == [32, 32, 32]
  assert [int(b["mask"].sum()) for b in batches] == [32, 32, 6]
  seen = np.concatenate([b["image"][b["mask"]] for b in batches])
  np.testing.assert_array_equal(seen, x)
  parts = [list(pipeline.eval_batches((x, y), 32, shard=(i, 2))) for i in range(2)]
  seen = np.concatenate([b["label"][b["mask"]] for i in range(3) for b in (parts[0][i], parts[1][i])])
  np.testing.assert_array_equal(seen, y)


def _make_folder(root, n_per_class: int = 6):
  """Two classes of random-noise PNGs of varied sizes; returns the ImageFolder."""
  rng = np.random.default_rng(0)
  for c in ("ants", "bees"):
    (root / c).mkdir(parents=True)
    for i in range(n_per_class):
      size = (int(rng.integers(20, 40)), int(rng.integers(20, 40)), 3)
      Image.fromarray(rng.integers(0, 256, size, dtype=np.uint8)).save(root / c / f"{i}.png")
  return ImageFolder(root)


def test_folder_epoch_is_deterministic_resumable_and_reshuffled(tmp_path):
  folder = _make_folder(tmp_path)
  ds = pipeline.folder_epoch(folder, 4, seed=0, epoch=1, image_size=16,
                             augment=KerasAugment(horizontal_flip=True))
  assert len(ds) == 3
  batches = list(pipeline.prefetch(ds))
  assert batches[0]["image"].shape == (4, 16, 16, 3) and batches[0]["image"].dtype == np.uint8
  assert batches[0]["label"].dtype == np.int64
  labels = np.concatenate([b["label"] for b in batches])
  assert sorted(labels) == sorted(folder.labels)  # 12 examples, 3 full batches
  again = pipeline.folder_epoch(folder, 4, seed=0, epoch=1, image_size=16,
                                augment=KerasAugment(horizontal_flip=True))
  for a, b in zip(batches[1:], pipeline.prefetch(again[1:])):
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["label"], b["label"])
  other = pipeline.folder_epoch(folder, 4, seed=0, epoch=2, image_size=16)
  assert not np.array_equal(other[0]["image"], batches[0]["image"])


def test_folder_epoch_process_shards_split_each_global_batch(tmp_path):
  folder = _make_folder(tmp_path)
  whole = pipeline.folder_epoch(folder, 4, seed=3, epoch=0, image_size=8)[2]["label"]
  parts = [pipeline.folder_epoch(folder, 4, seed=3, epoch=0, image_size=8, shard=(i, 2))[2]
           for i in range(2)]
  assert [len(p["label"]) for p in parts] == [2, 2]
  assert sorted(np.concatenate([p["label"] for p in parts])) == sorted(whole)


@pytest.mark.slow
def test_workers_give_the_in_process_batches_and_stop_when_left_early():
  x, y = make_images(80)
  augment = KerasAugment(crop_padding=4, horizontal_flip=True)
  ds = pipeline.train_epoch((x, y), 8, seed=1, epoch=0, augment=augment)[2:]
  in_process = list(pipeline.prefetch(ds))
  assert len(in_process) == 8
  for k, batch in enumerate(pipeline.prefetch(ds, workers=2)):
    np.testing.assert_array_equal(batch["image"], in_process[k]["image"])
    np.testing.assert_array_equal(batch["label"], in_process[k]["label"])
    if k == 4:
      assert multiprocessing.active_children()  # the workers that made these batches
      break
  deadline = time.monotonic() + 30
  while multiprocessing.active_children() and time.monotonic() < deadline:
    time.sleep(0.05)
  assert not multiprocessing.active_children()


@pytest.mark.slow
def test_folder_epoch_with_workers_gives_the_in_process_batches(tmp_path):
  ds = pipeline.folder_epoch(_make_folder(tmp_path), 4, seed=0, epoch=0, image_size=8)
  with_workers = list(pipeline.prefetch(ds, workers=2))
  assert len(with_workers) == 3
  for a, b in zip(pipeline.prefetch(ds), with_workers):
    np.testing.assert_array_equal(a["image"], b["image"])


@pytest.mark.parametrize("kwargs, message", [
    ({"workers": -1}, r"data.workers=-1; expected 0 \(in-process\)"),
    ({"buffer": 0}, r"prefetch buffer=0; expected a positive number"),
])
def test_prefetch_rejects_bad_arguments(kwargs, message):
  x, y = make_images(16)
  with pytest.raises(UserError, match=message):
    pipeline.prefetch(pipeline.train_epoch((x, y), 8, seed=0, epoch=0), **kwargs)
