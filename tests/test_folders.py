"""Tests of cnnjax.data.folders on small image folders generated in tmp_path."""
import grain
import numpy as np
import pytest
from PIL import Image

from cnnjax.data import folders
from cnnjax.data.folders import (ImageFolder, load_image_folder, random_resized_crop,
                                 resize_center_crop, split_roots)
from cnnjax.errors import UserError

# Each class's images are filled with its own grey level, so a label can be checked
# against the decoded pixels.
_CLASS_LEVEL = {"ant": 30, "bee": 130, "wasp": 230}


def _save(path, level: int, mode: str = "RGB", size=(12, 9)) -> None:
  """Writes a solid image of grey ``level`` (``size`` is PIL's (width, height))."""
  path.parent.mkdir(parents=True, exist_ok=True)
  image = Image.new("RGB", size, (level,) * 3)
  # quantize: an exact adaptive palette (convert("P") dithers to the web palette).
  (image.quantize() if mode == "P" else image.convert(mode)).save(path)


def _make_folder(root) -> None:
  """3 classes created out of sorted order, mixed formats, extension cases and modes."""
  _save(root / "wasp" / "w1.png", _CLASS_LEVEL["wasp"], size=(20, 10))
  _save(root / "wasp" / "sub" / "w2.BMP", _CLASS_LEVEL["wasp"])
  _save(root / "ant" / "a2.JPG", _CLASS_LEVEL["ant"])
  _save(root / "ant" / "a1.jpeg", _CLASS_LEVEL["ant"], size=(9, 14))
  _save(root / "bee" / "b1.png", _CLASS_LEVEL["bee"], mode="L")
  _save(root / "bee" / "b2.png", _CLASS_LEVEL["bee"], mode="RGBA")
  _save(root / "bee" / "b3.png", _CLASS_LEVEL["bee"], mode="P")
  (root / "bee" / "notes.txt").write_text("not an image")
  _save(root / "bee" / "._b1.png", 0)  # Hidden (macOS resource fork style): ignored.
  _save(root / ".ipynb_checkpoints" / "x.png", 0)


def _assert_labels_match_pixels(folder: ImageFolder) -> None:
  for i in range(len(folder)):
    item = folder[i]
    assert item["image"].dtype == np.uint8 and item["image"].shape[2] == 3
    level = _CLASS_LEVEL[folder.class_names[item["label"]]]
    np.testing.assert_allclose(item["image"], level, atol=3)  # JPEG may be off by a bit.


def test_image_folder_scans_sorted_classes_and_files(tmp_path):
  _make_folder(tmp_path)
  folder = ImageFolder(tmp_path)
  assert folder.class_names == ["ant", "bee", "wasp"]
  names = [p.split("/")[-1] for p in folder.paths]
  assert names == ["a1.jpeg", "a2.JPG", "b1.png", "b2.png", "b3.png", "w2.BMP", "w1.png"]
  assert folder.labels.dtype == np.int64
  np.testing.assert_array_equal(folder.labels, [0, 0, 1, 1, 1, 2, 2])
  _assert_labels_match_pixels(folder)
  assert folder[6]["image"].shape == (10, 20, 3)
  assert isinstance(folder[0]["label"], int)


def test_greyscale_png_becomes_rgb(tmp_path):
  grey = np.arange(24, dtype=np.uint8).reshape(4, 6) * 10
  (tmp_path / "c").mkdir()
  Image.fromarray(grey, "L").save(tmp_path / "c" / "g.png")
  image = ImageFolder(tmp_path)[0]["image"]
  assert image.shape == (4, 6, 3)
  np.testing.assert_array_equal(image, np.repeat(grey[..., None], 3, axis=2))


def test_corrupt_file_is_skipped_with_a_warning_naming_it(tmp_path):
  _make_folder(tmp_path)
  bad = tmp_path / "ant" / "a15.jpg"  # Sorts between a1.jpeg and a2.JPG.
  bad.write_bytes(np.random.default_rng(0).bytes(500))
  with pytest.warns(UserWarning, match="a15.jpg") as record:
    folder = ImageFolder(tmp_path)
  assert len(record) == 1 and str(bad) in str(record[0].message)
  assert len(folder) == 7 and str(bad) not in folder.paths
  _assert_labels_match_pixels(folder)


def test_truncated_jpeg_raises_on_access_and_is_skipped_when_loading(tmp_path):
  _make_folder(tmp_path)
  bad = tmp_path / "bee" / "b0.jpg"
  full = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
  Image.fromarray(full).save(bad)
  bad.write_bytes(bad.read_bytes()[:-500])  # The header survives, so the scan keeps it.
  folder = ImageFolder(tmp_path)
  index = folder.paths.index(str(bad))
  with pytest.raises(UserError, match="b0.jpg"):
    folder[index]  # pylint: disable=pointless-statement
  with pytest.warns(UserWarning, match="b0.jpg"):
    images, labels, _ = load_image_folder(tmp_path, 8)
  assert len(images) == len(labels) == 7


def test_usable_as_grain_source(tmp_path):
  _make_folder(tmp_path)
  folder = ImageFolder(tmp_path)
  dataset = grain.MapDataset.source(folder)
  assert len(dataset) == 7
  assert dataset[4]["label"] == 1
  np.testing.assert_array_equal(dataset[4]["image"], folder[4]["image"])


def test_empty_class_folder_warns_and_keeps_the_class(tmp_path):
  _make_folder(tmp_path)
  (tmp_path / "aardvark").mkdir()
  with pytest.warns(UserWarning, match="aardvark"):
    folder = ImageFolder(tmp_path)
  assert folder.class_names[0] == "aardvark" and 0 not in folder.labels
  _assert_labels_match_pixels(folder)


@pytest.mark.filterwarnings("ignore:class folder .* has no readable images")
@pytest.mark.parametrize("setup", ["missing", "empty", "flat", "no_images"])
def test_bad_roots_name_the_root(tmp_path, setup):
  root = tmp_path / "data"
  if setup != "missing":
    root.mkdir()
  if setup == "flat":
    _save(root / "x.png", 0)
  if setup == "no_images":
    (root / "cls").mkdir()
    (root / "cls" / "readme.txt").write_text("no images")
  with pytest.raises(UserError) as e:
    ImageFolder(root)
  assert str(root) in str(e.value) and "\n" not in str(e.value)


def test_split_roots(tmp_path):
  for name in ("train", "validation", "test"):
    (tmp_path / name).mkdir()
  assert split_roots(tmp_path) == {"train": tmp_path / "train",
                                   "val": tmp_path / "validation",
                                   "test": tmp_path / "test"}
  (tmp_path / "val").mkdir()
  with pytest.raises(UserError, match="validation"):
    split_roots(tmp_path)
  assert split_roots(tmp_path / "val") == {}
  with pytest.raises(UserError, match="nowhere"):
    split_roots(tmp_path / "nowhere")


def _ramp(h: int, w: int) -> np.ndarray:
  """``[h, w, 3]`` image whose pixel (y, x) is (y, x, y + x): every crop is recognisable."""
  y, x = np.mgrid[:h, :w]
  return np.stack([y, x, y + x], axis=-1).astype(np.uint8)


def test_resize_center_crop_without_resampling_is_the_center(tmp_path):
  image = _ramp(20, 31)
  np.testing.assert_array_equal(resize_center_crop(image, 20), image[:, 6:26])
  np.testing.assert_array_equal(resize_center_crop(image, 16, resize=20), image[2:18, 8:24])


def test_resize_center_crop_resizes_the_short_side():
  image = np.zeros((40, 60, 3), np.uint8)
  image[:, 30:] = 255  # Left half black, right half white.
  out = resize_center_crop(image, 16, resize=20)  # -> 20 x 30, then crop [2:18, 7:23].
  assert out.shape == (16, 16, 3) and out.dtype == np.uint8
  assert (out[:, :7] == 0).all() and (out[:, 9:] == 255).all()


def test_resize_center_crop_rejects_resize_below_size():
  with pytest.raises(UserError, match="resize=10"):
    resize_center_crop(_ramp(20, 20), 16, resize=10)
  with pytest.raises(ValueError, match="float"):
    resize_center_crop(np.zeros((8, 8, 3)), 4)


def test_random_resized_crop_is_deterministic_given_the_generator():
  image = _ramp(30, 50)
  crop = lambda seed: random_resized_crop(image, 12, np.random.default_rng(seed))
  assert crop(0).shape == (12, 12, 3) and crop(0).dtype == np.uint8
  np.testing.assert_array_equal(crop(0), crop(0))
  assert any(not np.array_equal(crop(0), crop(s)) for s in range(1, 4))


def test_random_resized_crop_whole_image_and_fallback():
  rng = np.random.default_rng(0)
  square = _ramp(24, 24)
  np.testing.assert_array_equal(
      random_resized_crop(square, 24, rng, scale=(1, 1), ratio=(1, 1)), square)
  wide = _ramp(20, 40)  # No square of the whole area fits: center crop of ratio 1.
  np.testing.assert_array_equal(
      random_resized_crop(wide, 20, rng, scale=(1, 1), ratio=(1, 1)), wide[:, 10:30])


def test_crop_boxes_lie_inside_the_image_with_area_and_ratio_in_range():
  rng = np.random.default_rng(0)
  for _ in range(200):
    top, left, h, w = folders._crop_box(30, 50, rng, (0.08, 1.0), (3 / 4, 4 / 3))  # pylint: disable=protected-access
    assert 0 <= top and top + h <= 30 and 0 <= left and left + w <= 50
    assert 0.06 <= h * w / 1500 <= 1.0 and 0.6 <= w / h <= 1.5


def test_load_image_folder(tmp_path):
  _make_folder(tmp_path)
  images, labels, class_names = load_image_folder(tmp_path, 8)
  assert images.shape == (7, 8, 8, 3) and images.dtype == np.uint8
  assert labels.dtype == np.int64 and class_names == ["ant", "bee", "wasp"]
  levels = np.array([_CLASS_LEVEL[class_names[l]] for l in labels])
  np.testing.assert_allclose(images, np.broadcast_to(levels[:, None, None, None], images.shape),
                             atol=3)
