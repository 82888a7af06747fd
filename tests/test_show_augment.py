"""``python -m experiments.show_augment`` on a generated .npz."""
import os

import numpy as np
import pytest
from PIL import Image

from experiments import entry, show_augment

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "experiments/configs/keras_augment.py")


def test_writes_the_original_and_augmented_versions(tmp_path, npz_path, capsys):
  with pytest.raises(SystemExit) as exit_info:
    show_augment.cli(["show_augment", "--config", CONFIG, f"--config.data.source={npz_path}",
                      "--out", str(tmp_path / "out"), "--image", "3", "--count", "5"])
  assert exit_info.value.code == 0
  path = tmp_path / "out" / "augment_3.png"
  assert f"wrote {path}" in capsys.readouterr().out
  assert Image.open(path).size[0] > 0

  config = entry.load_config_file(CONFIG)
  config.data.source = str(npz_path)
  images, class_name = show_augment.augmented_versions(config, 3, 5)
  with np.load(npz_path) as f:
    np.testing.assert_array_equal(images[0], f["x_train"][3])
    assert class_name == f"c{f['y_train'][3]}"
  assert images.shape == (6, 32, 32, 3) and images.dtype == np.uint8
  for version in images[1:]:
    assert not np.array_equal(version, images[0])
  assert len({v.tobytes() for v in images[1:]}) == 5  # each version drawn anew


@pytest.mark.parametrize("args, message", [
    (["--image", "999"], r"^error: --image=999; expected an index in \[0, 192\)$"),
    (["--config.data.augment.rotation=0", "--config.data.augment.width_shift=0",
      "--config.data.augment.height_shift=0", "--config.data.augment.shear=0",
      "--config.data.augment.zoom=0", "--config.data.augment.horizontal_flip=False"],
     r"^error: config.data.augment turns every augmentation off"),
    (["--config.data.augment.rotatio=3"], r"^error: unknown config key 'data.augment.rotatio'"),
])
def test_bad_input_is_one_line(tmp_path, npz_path, capsys, args, message):
  with pytest.raises(SystemExit) as exit_info:
    show_augment.cli(["show_augment", "--config", CONFIG, f"--config.data.source={npz_path}",
                       "--out", str(tmp_path), *args])
  assert exit_info.value.code == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1
  assert pytest.importorskip("re").search(message, err), err
