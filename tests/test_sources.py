"""Reading local data: an .npz (read straight into its arrays, not through np.load's small
reads) gives np.load's arrays, C- or Fortran-ordered; under ``data.limit`` it reads only the
first rows and gives what reading it whole and cutting it would; a truncated array is one
line; a read started ahead (``read_ahead``) is what ``load`` returns."""
import io
import subprocess
import sys
import zipfile

import numpy as np
import pytest

from cnnjax.data import sources
from cnnjax.errors import UserError
from tests.conftest import make_images


@pytest.mark.parametrize("save", [np.savez, np.savez_compressed])
@pytest.mark.parametrize("order", ["C", "F"])
def test_npz_reads_np_loads_arrays_and_a_limit_the_first_rows_as_a_cut_of_the_whole(
    tmp_path, save, order, monkeypatch):
  monkeypatch.setattr(sources, "_READ_BYTES", 1000)  # several pieces per array
  x, y = make_images(100)
  x = np.asarray(x, order=order)
  y[-1] = 11  # beyond the first rows: still counts as a class
  save(tmp_path / "d.npz", x_train=x, y_train=y, x_test=x[:50], y_test=y[:50],
       test_is_lossless=np.arange(50) < 10)
  whole = sources.load_npz(tmp_path / "d.npz")
  with np.load(tmp_path / "d.npz") as f:
    np.testing.assert_array_equal(whole.train[0], f["x_train"])
    np.testing.assert_array_equal(whole.test[0], f["x_test"])
  whole = whole.head(20)
  head = sources.load_npz(tmp_path / "d.npz", limit=20)
  for a, b in [(whole.train, head.train), (whole.test, head.test)]:
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
  np.testing.assert_array_equal(whole.test_subsets["lossless"], head.test_subsets["lossless"])
  assert head.class_names == whole.class_names and len(head.class_names) == 12
  head.train[0][0, 0, 0, 0] = whole.train[0][0, 0, 0, 0] = 1  # writable, as np.load's are


def test_an_npz_array_shorter_than_its_header_says_is_one_line(tmp_path):
  x, y = make_images(10)
  header = io.BytesIO()
  np.lib.format.write_array_header_1_0(header, {"descr": "|u1", "fortran_order": False,
                                                "shape": (20, 32, 32, 3)})
  with zipfile.ZipFile(tmp_path / "d.npz", "w") as zf:
    zf.writestr("x_train.npy", header.getvalue() + x.tobytes())  # 10 of the 20 images
    for name, array in [("y_train", y), ("x_test", x), ("y_test", y)]:
      with zf.open(f"{name}.npy", "w") as f:
        np.lib.format.write_array(f, array)
  with pytest.raises(UserError, match=r"x_train ends before its \(20, 32, 32, 3\) array does"):
    sources.load_npz(tmp_path / "d.npz")


def test_read_ahead_hands_load_the_file_it_read_once_and_its_error_as_load_would(tmp_path):
  x, y = make_images(30)
  np.savez(tmp_path / "d.npz", x_train=x, y_train=y, x_test=x[:10], y_test=y[:10])
  sources.read_ahead(str(tmp_path / "d.npz"), limit=5)
  assert len(sources._AHEAD) == 1
  ahead = sources.load(str(tmp_path / "d.npz"), limit=5)  # the thread's Dataset
  assert not sources._AHEAD  # taken once: the next load reads the file again
  again = sources.load(str(tmp_path / "d.npz"), limit=5)
  np.testing.assert_array_equal(ahead.train[0], x[:5])
  np.testing.assert_array_equal(ahead.test[1], again.test[1])
  sources.read_ahead(str(tmp_path / "d.npz"))
  np.savez(tmp_path / "d.npz", x_train=x[:20], y_train=y[:20], x_test=x[:10], y_test=y[:10])
  assert len(sources.load(str(tmp_path / "d.npz")).train[0]) == 20  # rewritten: read anew
  sources.read_ahead(str(tmp_path / "d.npz"))
  sources.read_ahead(str(tmp_path / "missing.npz"))  # not a file: load's own error, later
  assert not sources._AHEAD  # and the untaken read before it is dropped
  sources.read_ahead("cifar10")  # a TFDS name: nothing read ahead
  assert not sources._AHEAD
  (tmp_path / "bad.npz").write_bytes(b"PK\x03\x04 not a zip")
  sources.read_ahead(str(tmp_path / "bad.npz"))
  assert len(sources._AHEAD) == 1
  with pytest.raises(UserError, match="bad.npz is not an .npz archive"):
    sources.load(str(tmp_path / "bad.npz"))


def test_config_and_sources_import_no_jax():
  """A command reads its .npz ahead (``read_ahead``) while JAX imports: the modules it needs
  before that must not import JAX themselves."""
  code = ("import sys, cnnjax.config, cnnjax.data.sources\n"
          "print(sorted(m for m in ('jax', 'flax', 'optax') if m in sys.modules))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == "[]"
