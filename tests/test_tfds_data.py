"""Tests for cnnjax.data.tfds_data: TensorFlow-free preparation and reading of TFDS datasets,
preparation on first use, and MNIST from the files shipped with cnnjax.

Every dataset here is a tiny fake in the official file format, written to ``tmp_path``;
nothing uses the network (downloads and the reachability check are patched).
"""
import hashlib
import http.server
import io
import logging
import pickle
import re
import shutil
import socket
import tarfile
import threading
import time

import numpy as np
from PIL import Image
import pytest
import tensorflow_datasets as tfds

from cnnjax.data import idx
from cnnjax.data import sources
from cnnjax.data import tfds_builders, tfds_data
from cnnjax.errors import UserError

CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                 "ship", "truck"]


def _images(rng: np.random.Generator, n: int, shape: tuple[int, ...]) -> np.ndarray:
  return rng.integers(0, 256, (n, *shape), dtype=np.uint8)


def _cifar_batch(images: np.ndarray, **labels: list[int]) -> dict[bytes, object]:
  """One pickled batch as the official archive holds it: ``data`` rows are CHW planes."""
  data = images.transpose(0, 3, 1, 2).reshape(len(images), 3072)
  return {b"data": data, **{k.encode(): v for k, v in labels.items()}}


def _write_tar_gz(path, top: str, members: dict[str, object | bytes]) -> None:
  """A ``.tar.gz`` of ``top/<name>`` members: objects pickled, ``bytes`` written as they are.

  Protocol 3 names the globals the official (Python 2) pickles name; protocol 2 written by
  Python 3 would add ``_codecs.encode`` for every bytes object.
  """
  with tarfile.open(path, "w:gz") as tar:
    for name, obj in members.items():
      data = obj if isinstance(obj, bytes) else pickle.dumps(obj, protocol=3)
      info = tarfile.TarInfo(f"{top}/{name}")
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))


def trust(monkeypatch, builder: type[tfds_builders._OfficialFilesBuilder], path) -> None:
  """Makes ``builder`` take the fake archive ``path`` for the official one (its sha256)."""
  (url,) = builder.FILES.values()
  data = path.read_bytes()
  monkeypatch.setattr(builder, "url_infos", {url: tfds_builders._UrlInfo(
      size=len(data), checksum=hashlib.sha256(data).hexdigest(), filename=path.name)})


def _fake_cifar10(folder, names=CIFAR10_NAMES):
  """Writes ``cifar-10-python.tar.gz`` (5 train batches of 2 images, a test batch of 3).

  Returns:
    ``{'train': (images [10, 32, 32, 3], labels [10]), 'test': (images [3, ...], [3])}``.
  """
  rng = np.random.default_rng(0)
  train_x, test_x = _images(rng, 10, (32, 32, 3)), _images(rng, 3, (32, 32, 3))
  train_y, test_y = rng.integers(0, 10, 10), np.array([3, 8, 0])
  members = {f"data_batch_{i + 1}": _cifar_batch(train_x[2 * i:2 * i + 2],
                                                 labels=train_y[2 * i:2 * i + 2].tolist())
             for i in range(5)}
  members["test_batch"] = _cifar_batch(test_x, labels=test_y.tolist())
  members["batches.meta"] = {b"label_names": [n.encode() for n in names]}
  _write_tar_gz(folder / "cifar-10-python.tar.gz", "cifar-10-batches-py", members)
  return {"train": (train_x, train_y), "test": (test_x, test_y)}


def _assert_arrays(arrays, expected, class_names):
  assert set(arrays) == {"train", "test", "class_names"}
  for split in ("train", "test"):
    images, labels = arrays[split]
    assert images.dtype == np.uint8 and labels.dtype == np.int64
    np.testing.assert_array_equal(images, expected[split][0])
    np.testing.assert_array_equal(labels, expected[split][1])
  assert arrays["class_names"] == class_names


def test_cifar10_prepared_from_source_dir_reads_back_exactly(tmp_path, monkeypatch):
  (tmp_path / "src").mkdir()
  expected = _fake_cifar10(tmp_path / "src")
  trust(monkeypatch, tfds_builders.CnnjaxCifar10, tmp_path / "src" / "cifar-10-python.tar.gz")
  path = tfds_data.prepare("cifar10", data_dir=tmp_path / "tfds", source_dir=tmp_path / "src")
  assert path == str(tmp_path / "tfds" / "cnnjax_cifar10" / "1.0.0")
  _assert_arrays(tfds_data.load_arrays("cifar10", data_dir=tmp_path / "tfds"), expected,
                 CIFAR10_NAMES)
  # Plain tfds reads it too, in the official order.
  train = tfds.data_source("cnnjax_cifar10", split="train", data_dir=tmp_path / "tfds")
  np.testing.assert_array_equal(train[9]["image"], expected["train"][0][9])


def test_cifar100_uses_fine_labels(tmp_path, monkeypatch):
  rng = np.random.default_rng(1)
  train_x, test_x = _images(rng, 4, (32, 32, 3)), _images(rng, 2, (32, 32, 3))
  fine_train, fine_test = [99, 0, 57, 3], [12, 98]
  names = list(tfds_builders.CnnjaxCifar100.CLASS_NAMES)
  _write_tar_gz(tmp_path / "cifar-100-python.tar.gz", "cifar-100-python", {
      "train": _cifar_batch(train_x, fine_labels=fine_train, coarse_labels=[1, 2, 3, 4]),
      "test": _cifar_batch(test_x, fine_labels=fine_test, coarse_labels=[5, 6]),
      "meta": {b"fine_label_names": [n.encode() for n in names],
               b"coarse_label_names": [b"c%d" % i for i in range(20)]},
  })
  trust(monkeypatch, tfds_builders.CnnjaxCifar100, tmp_path / "cifar-100-python.tar.gz")
  tfds_data.prepare("cifar100", data_dir=tmp_path / "tfds", source_dir=tmp_path)
  arrays = tfds_data.load_arrays("cifar100", data_dir=tmp_path / "tfds")
  _assert_arrays(arrays, {"train": (train_x, fine_train), "test": (test_x, fine_test)}, names)
  assert names[:2] == ["apple", "aquarium_fish"] and names[-1] == "worm"


def _write_idx_files(folder, arrays) -> None:
  """Writes the 4 official idx ``.gz`` files of ``{split: (images [N, 28, 28, 1], labels)}``."""
  for split, prefix in (("train", "train"), ("test", "t10k")):
    idx.write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", arrays[split][0][..., 0])
    idx.write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", arrays[split][1])


@pytest.mark.parametrize("name, class_names", [
    ("mnist", list("0123456789")),
    ("fashion_mnist", ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal",
                       "Shirt", "Sneaker", "Bag", "Ankle boot"]),
])
def test_idx_datasets_prepared_by_the_cli(tmp_path, capsys, name, class_names):
  rng = np.random.default_rng(2)
  expected = {"train": (_images(rng, 5, (28, 28, 1)), np.array([5, 0, 4, 1, 9])),
              "test": (_images(rng, 3, (28, 28, 1)), np.array([7, 2, 1]))}
  _write_idx_files(tmp_path, expected)
  argv = ["prepare", name, "--data_dir", str(tmp_path / "tfds"), "--source_dir", str(tmp_path)]
  assert tfds_data.main(argv) == 0
  assert f"{name} prepared in {tmp_path / 'tfds' / f'cnnjax_{name}'}" in capsys.readouterr().out
  _assert_arrays(tfds_data.load_arrays(name, data_dir=tmp_path / "tfds"), expected, class_names)


def _prepare_stock_cifar10(data_dir, expected) -> None:
  """Writes ``expected`` as tfds' stock ``cifar10`` would (PNG ``image``, ``id``, names)."""

  class StockCifar10(tfds.builder_cls("cifar10"), skip_registration=True):
    name = "cifar10"

    def _split_generators(self, dl_manager):
      del dl_manager
      self.info.features["label"].names = CIFAR10_NAMES  # As the stock builder does.
      return {split: self._generate_examples(*expected[split]) for split in expected}

    def _generate_examples(self, images, labels):
      for i, (image, label) in enumerate(zip(images, labels)):
        png = io.BytesIO()
        Image.fromarray(image).save(png, format="PNG")
        yield i, {"id": f"{i}", "image": png.getvalue(), "label": label}

  StockCifar10(data_dir=data_dir, file_format="array_record").download_and_prepare()


def test_stock_dataset_prepared_elsewhere_is_read(tmp_path):
  rng = np.random.default_rng(3)
  expected = {"train": (_images(rng, 4, (32, 32, 3)), np.array([6, 9, 9, 4])),
              "test": (_images(rng, 2, (32, 32, 3)), np.array([3, 8]))}
  _prepare_stock_cifar10(tmp_path, expected)
  arrays = tfds_data.load_arrays("cifar10", data_dir=tmp_path)
  # The stock builder lets tfds shuffle the records when writing: compare as multisets.
  for split in ("train", "test"):
    images, labels = arrays[split]
    assert images.dtype == np.uint8 and labels.dtype == np.int64
    assert (sorted((int(y), x.tobytes()) for x, y in zip(images, labels))
            == sorted((int(y), x.tobytes()) for x, y in zip(*expected[split])))
  assert arrays["class_names"] == CIFAR10_NAMES


def test_stock_dataset_stored_as_tfrecord_is_a_user_error(tmp_path):
  images = np.zeros((1, 32, 32, 3), np.uint8)
  _prepare_stock_cifar10(tmp_path, {"train": (images, [0]), "test": (images, [1])})
  # Writing tfrecord needs TensorFlow: relabel the array_record files as tfrecord instead.
  info = tmp_path / "cifar10" / "3.0.2" / "dataset_info.json"
  info.write_text(info.read_text().replace('"fileFormat": "array_record"',
                                           '"fileFormat": "tfrecord"'))
  with pytest.raises(UserError, match="'cifar10' in .* is stored as tfrecord, which "
                     "tfds.data_source cannot read; expected array_record: prepare it with "
                     "`python -m cnnjax.data.tfds_data prepare cifar10 --data_dir"):
    tfds_data.load_arrays("cifar10", data_dir=tmp_path)


def test_not_prepared_is_a_one_line_user_error(tmp_path, caplog):
  with pytest.raises(tfds_data.NotPreparedError) as e:
    tfds_data.load_arrays("cifar10", data_dir=tmp_path, download=False)
  message = str(e.value)
  assert "\n" not in message
  assert f"TFDS dataset 'cifar10' is not prepared in {tmp_path}" in message
  assert f"python -m cnnjax.data.tfds_data prepare cifar10 --data_dir {tmp_path}" in message
  assert "--config.data.source=/path/cifar10.npz" in message
  # tfds' is_prepared() warns of each unprepared folder it looks at: silenced.
  assert not [r for r in caplog.records if "Variant folder" in r.getMessage()]
  assert list(tmp_path.iterdir()) == []


def _serve_fake_download(monkeypatch, archive) -> list[dict[str, str]]:
  """Reachable servers, and a download that copies ``archive`` into the downloads dir."""
  requests = []

  def download(self, files):
    requests.append(files)
    self._download_dir.mkdir(parents=True, exist_ok=True)
    return {f: shutil.copy(archive, self._download_dir / f) for f in files}

  monkeypatch.setattr(tfds_builders, "_unreachable", lambda url: None)
  monkeypatch.setattr(tfds.download.DownloadManager, "download", download)
  return requests


def test_first_use_prepares_then_loads(tmp_path, monkeypatch, capsys):
  (tmp_path / "src").mkdir()
  expected = _fake_cifar10(tmp_path / "src")
  requests = _serve_fake_download(monkeypatch, tmp_path / "src" / "cifar-10-python.tar.gz")
  arrays = tfds_data.load_arrays("cifar10", data_dir=tmp_path / "tfds")
  _assert_arrays(arrays, expected, CIFAR10_NAMES)
  assert requests == [tfds_builders.CnnjaxCifar10.FILES]
  assert "Generating splits" in capsys.readouterr().err  # tfds' progress bars
  assert (tmp_path / "tfds" / "cnnjax_cifar10" / "1.0.0" / "dataset_info.json").is_file()
  tfds_data.load_arrays("cifar10", data_dir=tmp_path / "tfds")  # Prepared: no download.
  assert len(requests) == 1


def test_first_use_offline_fails_fast_and_leaves_nothing(tmp_path, monkeypatch):
  def download(self, files):
    raise AssertionError("no download may be tried when the server is unreachable")

  monkeypatch.setattr(tfds_builders, "_unreachable", lambda url: "URLError: no route to host")
  monkeypatch.setattr(tfds.download.DownloadManager, "download", download)
  start = time.monotonic()
  with pytest.raises(UserError) as e:
    tfds_data.load_arrays("cifar10", data_dir=tmp_path)
  assert time.monotonic() - start < 10
  message = str(e.value)
  assert "\n" not in message
  assert message.startswith("cannot download cifar10's cifar-10-python.tar.gz (URLError: no "
                            "route to host); offline, pass a local .npz")
  assert "--source_dir DIR" in message and "--config.data.source=mnist" in message
  assert list(tmp_path.iterdir()) == []


def test_failed_download_leaves_no_partial_files(tmp_path, monkeypatch):
  (tmp_path / "tfds" / "keep").mkdir(parents=True)  # Not ours: stays.

  def download(self, files):
    partial = self._download_dir / "cifar-10-python.tar.gz.tmp.0123"
    partial.mkdir(parents=True)
    (partial / "cifar-10-python.tar.gz").write_bytes(b"half an archive")
    raise ConnectionError("connection reset")

  monkeypatch.setattr(tfds_builders, "_unreachable", lambda url: None)
  monkeypatch.setattr(tfds.download.DownloadManager, "download", download)
  with pytest.raises(UserError, match=r"cannot download cifar10's .* \(ConnectionError\); "
                     "offline, pass a local .npz"):
    tfds_data.prepare("cifar10", data_dir=tmp_path / "tfds")
  assert [p.name for p in (tmp_path / "tfds").iterdir()] == ["keep"]


@pytest.fixture
def http_server():
  """A local HTTP server answering every request; yields its URL."""
  server = http.server.HTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
  threading.Thread(target=server.serve_forever, daemon=True).start()
  yield f"http://127.0.0.1:{server.server_port}/cifar-10-python.tar.gz"
  server.shutdown()
  server.server_close()


def test_unreachable_asks_the_server_once(http_server):
  assert tfds_builders._unreachable(http_server) is None  # Even a 501 answer is an answer.
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]  # Closed once the block ends: nothing listens there.
  start = time.monotonic()
  reason = tfds_builders._unreachable(f"http://127.0.0.1:{port}/x", timeout=2)
  assert reason.startswith("URLError") and time.monotonic() - start < 3


def test_unknown_dataset_is_a_user_error(tmp_path):
  with pytest.raises(UserError, match="'no_such_set' is not prepared as array_record"):
    tfds_data.load_arrays("no_such_set", data_dir=tmp_path)
  with pytest.raises(UserError, match="cannot prepare dataset 'svhn'; expected one of cifar10"):
    tfds_data.prepare("svhn", data_dir=tmp_path)


def test_source_dir_without_the_official_file(tmp_path):
  with pytest.raises(UserError, match=re.escape(f"source dir {tmp_path} lacks cifar-10-python")):
    tfds_data.prepare("cifar10", data_dir=tmp_path / "tfds", source_dir=tmp_path)


def test_cli_reports_user_errors_on_one_line(tmp_path, capsys):
  assert tfds_data.main(["prepare", "mnist", "--source_dir", str(tmp_path)]) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: source dir") and err.count("\n") == 1


def test_idx_files_with_fewer_labels_than_images_are_rejected(tmp_path):
  images = np.zeros((3, 28, 28, 1), np.uint8)
  _write_idx_files(tmp_path, {"train": (images, [1, 2]), "test": (images, [1, 2, 3])})
  with pytest.raises(UserError, match=r"mnist train: the official files gave images "
                     r"\(3, 28, 28, 1\) and labels \(2,\); expected \[N, 28, 28, 1\] and \[N\]"):
    tfds_data.prepare("mnist", data_dir=tmp_path / "tfds", source_dir=tmp_path)


def test_archive_with_other_class_names_is_rejected(tmp_path, monkeypatch):
  _fake_cifar10(tmp_path, names=CIFAR10_NAMES[::-1])
  trust(monkeypatch, tfds_builders.CnnjaxCifar10, tmp_path / "cifar-10-python.tar.gz")
  with pytest.raises(UserError, match="class names .* differ from the official cifar10"):
    tfds_data.prepare("cifar10", data_dir=tmp_path / "tfds", source_dir=tmp_path)


def test_mnist_without_a_tfds_copy_is_read_from_the_shipped_files(tmp_path):
  data = sources.load("mnist", data_dir=str(tmp_path))
  assert data.train[0].shape == (60000, 28, 28, 1) and data.test[0].shape == (10000, 28, 28, 1)
  assert data.train[0].dtype == np.uint8 and data.train[1].dtype == np.int64
  assert data.train[1][:3].tolist() == [5, 0, 4] and data.test[1][:3].tolist() == [7, 2, 1]
  assert np.bincount(data.train[1]).tolist()[:2] == [5923, 6742]
  assert abs(data.train[0].mean() / 255 - 0.1307) < 1e-4
  assert data.class_names == list(tfds_builders.CnnjaxMnist.CLASS_NAMES)
  assert data.origin == (f"the official files shipped in {sources.MNIST_DIR} (no TFDS copy in "
                         f"{tmp_path})")
  assert list(tmp_path.iterdir()) == []


def test_mnist_prepared_in_tfds_is_preferred(tmp_path, caplog):
  rng = np.random.default_rng(4)
  expected = {"train": (_images(rng, 3, (28, 28, 1)), np.array([1, 2, 3])),
              "test": (_images(rng, 2, (28, 28, 1)), np.array([4, 5]))}
  _write_idx_files(tmp_path, expected)
  tfds_data.prepare("mnist", data_dir=tmp_path / "tfds", source_dir=tmp_path)
  caplog.set_level(logging.INFO)
  data = sources.load("mnist", data_dir=str(tmp_path / "tfds"))
  np.testing.assert_array_equal(data.train[0], expected["train"][0])
  np.testing.assert_array_equal(data.test[1], expected["test"][1])
  lines = [r.getMessage() for r in caplog.records if r.name.startswith("cnnjax")]
  assert lines == [f"mnist: reading TFDS's cnnjax_mnist from {tmp_path / 'tfds'}"]
  assert data.origin == f"TFDS in {tmp_path / 'tfds'}"


@pytest.mark.parametrize("name, shape, class_names", [
    ("cifar10", (32, 32, 3), CIFAR10_NAMES),
    ("mnist", (28, 28, 1), list("0123456789")),
    ("kmnist", (28, 28, 1), ["o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo"]),
])
def test_mock_data(tmp_path, name, shape, class_names):
  """mock_data fakes our builders, and stock ones (kmnist has no cnnjax builder)."""
  with tfds.testing.mock_data(num_examples=3):
    arrays = tfds_data.load_arrays(name, data_dir=tmp_path)
  for split in ("train", "test"):
    images, labels = arrays[split]
    assert images.shape == (3, *shape) and images.dtype == np.uint8
    assert labels.shape == (3,) and labels.dtype == np.int64
    assert labels.min() >= 0 and labels.max() < len(class_names)
  assert arrays["class_names"] == class_names


@pytest.mark.parametrize("name, problem", [
    ("imdb_reviews", r"has features \['label', 'text'\]; expected an 'image'"),
    ("oxford_flowers102", r"images of shape \(None, None, 3\); expected fixed-size"),
])
def test_datasets_without_fixed_size_images_are_rejected(tmp_path, name, problem):
  with tfds.testing.mock_data(num_examples=1), pytest.raises(UserError, match=problem):
    tfds_data.load_arrays(name, data_dir=tmp_path)
