"""Shared fixtures: small generated datasets; nothing here needs ../shared or the network."""
import numpy as np
import pytest

import cnnjax  # noqa: F401  (XLA CPU defaults before JAX starts)


def make_images(n: int, shape=(32, 32, 3), num_classes: int = 10, seed: int = 0):
  """Learnable synthetic images: each class brightens its own horizontal band."""
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, num_classes, n)
  images = rng.integers(0, 64, (n, *shape)).astype(np.int64)
  band = shape[0] // num_classes or 1
  for c in range(num_classes):
    images[labels == c, (c * band) % shape[0]:(c * band) % shape[0] + band] += 160
  return images.clip(0, 255).astype(np.uint8), labels.astype(np.int64)


@pytest.fixture
def npz_path(tmp_path):
  """A CIFAR-shaped .npz in the ../shared/data layout: 192 train and 64 test images."""
  x_train, y_train = make_images(192, seed=1)
  x_test, y_test = make_images(64, seed=2)
  lossless = np.arange(64) < 16
  path = tmp_path / "tiny_cifar.npz"
  np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test,
           test_is_lossless=lossless, class_names=np.array([f"c{i}" for i in range(10)]))
  return path
