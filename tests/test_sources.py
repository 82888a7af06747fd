"""Reading local data: an .npz (read in one piece per array, not by np.load's chunks) gives
np.load's arrays; under ``data.limit`` it reads only the first rows and gives what reading it
whole and cutting it would."""
import numpy as np
import pytest

from cnnjax.data import sources
from tests.conftest import make_images


@pytest.mark.parametrize("save", [np.savez, np.savez_compressed])
def test_npz_reads_np_loads_arrays_and_a_limit_the_first_rows_as_a_cut_of_the_whole(tmp_path, save):
  x, y = make_images(100)
  y[-1] = 11  # beyond the first rows: still counts as a class
  save(tmp_path / "d.npz", x_train=x, y_train=y, x_test=x[:50], y_test=y[:50],
       test_is_lossless=np.arange(50) < 10)
  whole = sources.load_npz(tmp_path / "d.npz")
  with np.load(tmp_path / "d.npz") as f:
    np.testing.assert_array_equal(whole.train[0], f["x_train"])
    np.testing.assert_array_equal(whole.test[0], f["x_test"])
    assert whole.train[0].dtype == f["x_train"].dtype
  whole = whole.head(20)
  head = sources.load_npz(tmp_path / "d.npz", limit=20)
  for a, b in [(whole.train, head.train), (whole.test, head.test)]:
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
  np.testing.assert_array_equal(whole.test_subsets["lossless"], head.test_subsets["lossless"])
  assert head.class_names == whole.class_names and len(head.class_names) == 12
  head.train[0][0, 0, 0, 0] = whole.train[0][0, 0, 0, 0] = 1  # writable, as np.load's are
