"""Tests of cnnjax.data.idx on small idx files generated in tmp_path, and of the MNIST
files shipped with cnnjax."""
import gzip
import hashlib
import struct

import numpy as np
import pytest

from cnnjax.data.idx import load_idx_folder, read_idx, write_idx
from cnnjax.data.sources import MNIST_DIR
from cnnjax.errors import UserError

# md5 of the official (uncompressed) MNIST idx files from yann.lecun.com.
OFFICIAL_MNIST_MD5 = {
    "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
    "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
    "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
    "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
}


def _images(n: int, seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, 256, (n, 28, 28), dtype=np.uint8)


def _one_line_error(excinfo: pytest.ExceptionInfo, *parts: str) -> str:
  message = str(excinfo.value)
  assert "\n" not in message
  for part in parts:
    assert part in message
  return message


def test_read_idx_parses_a_hand_written_file(tmp_path):
  images = _images(3)
  path = tmp_path / "x-idx3-ubyte"
  path.write_bytes(struct.pack(">I3I", 0x00000803, 3, 28, 28) + images.tobytes())
  out = read_idx(path)
  assert out.dtype == np.uint8 and out.shape == (3, 28, 28)
  np.testing.assert_array_equal(out, images)
  out[0, 0, 0] = 1  # Writable, not a view of an immutable buffer.


def test_write_idx_writes_the_official_header(tmp_path):
  path = tmp_path / "y-idx1-ubyte"
  write_idx(path, np.array([5, 0, 4], np.int64))
  assert path.read_bytes() == bytes.fromhex("00000801 00000003 050004")


@pytest.mark.parametrize("name", ["a-idx3-ubyte", "a-idx3-ubyte.gz"])
def test_round_trip(tmp_path, name):
  images = _images(4)
  write_idx(tmp_path / name, images)
  np.testing.assert_array_equal(read_idx(tmp_path / name, ndim=3), images)


def test_gzipped_files_are_reproducible(tmp_path):
  write_idx(tmp_path / "l.gz", np.arange(10, dtype=np.uint8))
  assert (tmp_path / "l.gz").read_bytes()[4:8] == bytes(4)  # gzip header mtime: 0


def test_shipped_mnist_is_the_official_data():
  assert sorted(p.name for p in MNIST_DIR.glob("*.gz")) == sorted(
      f"{name}.gz" for name in OFFICIAL_MNIST_MD5)
  for name, md5 in OFFICIAL_MNIST_MD5.items():
    with gzip.open(MNIST_DIR / f"{name}.gz") as f:
      assert hashlib.md5(f.read()).hexdigest() == md5, name


def test_gzip_is_recognised_by_content(tmp_path):
  labels = np.arange(10, dtype=np.uint8)
  write_idx(tmp_path / "l.gz", labels)
  assert (tmp_path / "l.gz").read_bytes()[:2] == b"\x1f\x8b"
  (tmp_path / "l.gz").rename(tmp_path / "l-idx1-ubyte")
  np.testing.assert_array_equal(read_idx(tmp_path / "l-idx1-ubyte"), labels)


@pytest.mark.parametrize("gz", [False, True])
def test_truncated_payload_names_file_and_sizes(tmp_path, gz):
  data = struct.pack(">I3I", 0x00000803, 60000, 28, 28) + bytes(1000)
  path = tmp_path / ("t.gz" if gz else "t")
  path.write_bytes(gzip.compress(data) if gz else data)
  with pytest.raises(UserError) as e:
    read_idx(path)
  _one_line_error(e, str(path), "expected 47040000 bytes", "found 1000")


def test_extra_bytes_are_an_error(tmp_path):
  path = tmp_path / "l"
  path.write_bytes(struct.pack(">II", 0x00000801, 2) + bytes(3))
  with pytest.raises(UserError) as e:
    read_idx(path)
  _one_line_error(e, str(path), "expected 2 bytes", "found 3")


@pytest.mark.parametrize("data, expected", [
    (bytes.fromhex("00000903 00000001"), "0x00000903"),  # int8 dtype
    (b"\x89PNG\r\n\x1a\n", "0x89504e47"),
    (bytes.fromhex("0000"), "expected 4 bytes"),
    (bytes.fromhex("00000803 00000002"), "expected 12 bytes of dimensions"),
])
def test_bad_header(tmp_path, data, expected):
  path = tmp_path / "bad"
  path.write_bytes(data)
  with pytest.raises(UserError) as e:
    read_idx(path)
  _one_line_error(e, str(path), expected)


def test_wrong_number_of_dimensions(tmp_path):
  write_idx(tmp_path / "labels", np.zeros(5, np.uint8))
  with pytest.raises(UserError) as e:
    read_idx(tmp_path / "labels", ndim=3)
  _one_line_error(e, "labels", "1 dimensions", "expected 3")


def test_corrupt_gzip(tmp_path):
  path = tmp_path / "c.gz"
  path.write_bytes(gzip.compress(bytes(100))[:20])
  with pytest.raises(UserError) as e:
    read_idx(path)
  _one_line_error(e, str(path))


def test_missing_file(tmp_path):
  with pytest.raises(UserError) as e:
    read_idx(tmp_path / "nope")
  _one_line_error(e, "nope")


@pytest.mark.parametrize("array", [np.array([1.0, 2.0]), np.array([0, 256]), np.array(3)])
def test_write_idx_rejects_what_uint8_idx_cannot_hold(tmp_path, array):
  with pytest.raises(UserError):
    write_idx(tmp_path / "w", array)


def _write_mnist(folder, n_train=5, n_test=3):
  """Writes the four files under names of each accepted form; returns the arrays."""
  arrays = {"train": (_images(n_train, 1), np.arange(n_train) % 10),
            "test": (_images(n_test, 2), (np.arange(n_test) + 7) % 10)}
  write_idx(folder / "train-images-idx3-ubyte.gz", arrays["train"][0])
  write_idx(folder / "train-labels-idx1-ubyte", arrays["train"][1])
  write_idx(folder / "t10k-images.idx3-ubyte", arrays["test"][0])
  write_idx(folder / "t10k-labels.idx1-ubyte.gz", arrays["test"][1])
  return arrays


def test_load_idx_folder(tmp_path):
  arrays = _write_mnist(tmp_path)
  data = load_idx_folder(tmp_path)
  assert set(data) == {"train", "test"}
  for split, (images, labels) in data.items():
    assert images.dtype == np.uint8 and images.shape[1:] == (28, 28, 1)
    assert labels.dtype == np.int64
    np.testing.assert_array_equal(images[..., 0], arrays[split][0])
    np.testing.assert_array_equal(labels, arrays[split][1])


def test_load_idx_folder_lists_missing_files(tmp_path):
  _write_mnist(tmp_path)
  (tmp_path / "t10k-labels.idx1-ubyte.gz").unlink()
  with pytest.raises(UserError) as e:
    load_idx_folder(tmp_path)
  message = _one_line_error(e, str(tmp_path), "t10k-labels-idx1-ubyte[.gz]")
  assert "train-images" not in message


def test_load_idx_folder_count_mismatch(tmp_path):
  _write_mnist(tmp_path)
  write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(4, np.uint8))
  with pytest.raises(UserError) as e:
    load_idx_folder(tmp_path)
  _one_line_error(e, "5 images", "4 labels")


def test_load_idx_folder_not_a_directory(tmp_path):
  with pytest.raises(UserError) as e:
    load_idx_folder(tmp_path / "mnist")
  _one_line_error(e, "mnist")
