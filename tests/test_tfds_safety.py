"""CIFAR archives are read without running their pickles' code, and a local archive must be
the official one (its sha256), as a downloaded one must."""
import builtins
import hashlib
import os
import pickle

import numpy as np
import pytest

from cnnjax.data import tfds_builders, tfds_data
from cnnjax.errors import UserError
from tests.test_tfds_data import (CIFAR10_NAMES, _cifar_batch, _fake_cifar10, _images,
                                  _write_tar_gz, trust)


class _Calls:
  """Unpickles as ``function(*args)``, as a crafted pickle may ask."""

  def __init__(self, function, *args):
    self.function, self.args = function, args

  def __reduce__(self):
    return self.function, self.args


def _cifar10_archive(folder, data_batch_1) -> None:
  """A ``cifar-10-python.tar.gz`` whose ``data_batch_1`` is the object ``data_batch_1``."""
  rng = np.random.default_rng(5)
  members = {f"data_batch_{i}": _cifar_batch(_images(rng, 1, (32, 32, 3)), labels=[i])
             for i in range(2, 6)}
  members["data_batch_1"] = data_batch_1
  members["test_batch"] = _cifar_batch(_images(rng, 1, (32, 32, 3)), labels=[0])
  members["batches.meta"] = {b"label_names": [n.encode() for n in CIFAR10_NAMES]}
  _write_tar_gz(folder / "cifar-10-python.tar.gz", "cifar-10-batches-py", members)


@pytest.mark.parametrize("function", [os.system, builtins.exec])
def test_a_pickle_that_runs_code_is_refused(tmp_path, monkeypatch, function):
  marker = tmp_path / "marker"
  command = (f"touch {marker}" if function is os.system
             else f"open({str(marker)!r}, 'w').close()")
  payload = _Calls(function, command)
  pickle.loads(pickle.dumps(payload))  # What plain pickle.load would do: run it.
  assert marker.exists()
  marker.unlink()
  _cifar10_archive(tmp_path, {b"data": payload, b"labels": [0]})
  trust(monkeypatch, tfds_builders.CnnjaxCifar10, tmp_path / "cifar-10-python.tar.gz")
  with pytest.raises(UserError) as e:
    tfds_data.prepare("cifar10", data_dir=tmp_path / "tfds", source_dir=tmp_path)
  message = str(e.value)
  assert "\n" not in message
  assert message.startswith(f"{tmp_path / 'cifar-10-python.tar.gz'}:cifar-10-batches-py/"
                            f"data_batch_1 asks to load {function.__module__}."
                            f"{function.__name__}, which its format does not hold; refused")
  assert not marker.exists()
  assert not (tmp_path / "tfds").exists()  # Nothing half-written left behind.


def test_numpy_1_pickles_are_read(tmp_path, monkeypatch):
  """The official archives name ``numpy.core.multiarray._reconstruct`` (numpy 2:
  ``numpy._core``)."""
  images = _images(np.random.default_rng(6), 2, (32, 32, 3))
  batch = pickle.dumps(_cifar_batch(images, labels=[4, 2]), protocol=3)
  assert b"cnumpy._core.multiarray\n_reconstruct\n" in batch
  _cifar10_archive(tmp_path, batch.replace(b"cnumpy._core.multiarray\n",
                                           b"cnumpy.core.multiarray\n"))
  trust(monkeypatch, tfds_builders.CnnjaxCifar10, tmp_path / "cifar-10-python.tar.gz")
  tfds_data.prepare("cifar10", data_dir=tmp_path / "tfds", source_dir=tmp_path)
  train_images, train_labels = tfds_data.load_arrays("cifar10", data_dir=tmp_path / "tfds")["train"]
  np.testing.assert_array_equal(train_images[:2], images)
  assert train_labels.tolist() == [4, 2, 2, 3, 4, 5]


def test_a_local_archive_with_another_sha256_is_refused(tmp_path):
  _fake_cifar10(tmp_path)
  path = tmp_path / "cifar-10-python.tar.gz"
  (official,) = tfds_builders.CnnjaxCifar10.url_infos.values()
  with pytest.raises(UserError) as e:
    tfds_data.prepare("cifar10", data_dir=tmp_path / "tfds", source_dir=tmp_path)
  assert str(e.value) == (
      f"{path}: sha256 {hashlib.sha256(path.read_bytes()).hexdigest()} differs from the "
      f"official cifar-10-python.tar.gz's {official.checksum}; expected the file from "
      "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz")
  assert not (tmp_path / "tfds").exists()  # Nothing half-written left behind.

