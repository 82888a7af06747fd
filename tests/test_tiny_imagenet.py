"""Tiny ImageNet from a generated miniature of the official zip (same layout, 3 classes)."""
import io
import time
import zipfile

import numpy as np
import pytest
from PIL import Image

from cnnjax import train
from cnnjax.data import sources, tiny_imagenet
from cnnjax.errors import UserError
from tests.conftest import tiny_config

WNIDS = ("n02124075", "n01443537", "n09999999")  # listed unsorted, as the official file is
WORDS = {"n01443537": "goldfish, Carassius auratus", "n02124075": "Egyptian cat",
         "n09999999": "placeholder, stand-in", "n00000001": "entity"}


def _jpeg(seed: int, gray: bool = False) -> bytes:
  rng = np.random.default_rng(seed)
  pixels = rng.integers(0, 256, (64, 64) if gray else (64, 64, 3), dtype=np.uint8)
  buf = io.BytesIO()
  Image.fromarray(pixels).save(buf, "JPEG", quality=95)
  return buf.getvalue()


def _files(train_per_class=4, val_per_class=2) -> dict[str, bytes | str]:
  files = {"wnids.txt": "\n".join(WNIDS) + "\n",
           "words.txt": "".join(f"{w}\t{n}\n" for w, n in WORDS.items())}
  annotations, k = [], 0
  for c, wnid in enumerate(WNIDS):
    files[f"train/{wnid}/{wnid}_boxes.txt"] = ""
    for i in range(train_per_class):
      files[f"train/{wnid}/images/{wnid}_{i}.JPEG"] = _jpeg(100 * c + i, gray=i == 1)
    for _ in range(val_per_class):
      files[f"val/images/val_{k}.JPEG"] = _jpeg(1000 + k)
      annotations.append(f"val_{k}.JPEG\t{wnid}\t0\t0\t63\t63")
      k += 1
  files["val/val_annotations.txt"] = "\n".join(annotations) + "\n"
  files["test/images/test_0.JPEG"] = _jpeg(5000)  # unlabelled, as the official test split
  return files


def _zip(path, files, prefix="tiny-imagenet-200/"):
  with zipfile.ZipFile(path, "w") as zf:
    for name, data in files.items():
      zf.writestr(prefix + name, data)
  return path


def test_zip_and_unzipped_folder_give_the_same_labelled_arrays(tmp_path):
  files = _files()
  path = _zip(tmp_path / "tiny-imagenet-200.zip", files)
  with zipfile.ZipFile(path) as zf:
    zf.extractall(tmp_path / "unzipped")
  data = sources.load(str(path))
  assert data.class_names == ["goldfish", "Egyptian cat", "placeholder"]  # sorted wnids
  assert data.train[0].shape == (12, 64, 64, 3) and data.train[0].dtype == np.uint8
  np.testing.assert_array_equal(data.train[1], np.repeat([0, 1, 2], 4))  # sorted files
  np.testing.assert_array_equal(data.test[1], [1, 1, 0, 0, 2, 2])  # val_0.. labelled n02124075
  assert data.val is not None and len(data.val[1]) == 6  # official val: validation and test
  gray = data.train[0][np.flatnonzero(data.train[1] == 1)[1]]
  np.testing.assert_array_equal(gray[..., 0], gray[..., 2])  # grayscale JPEG -> RGB
  for folder in (tmp_path / "unzipped", tmp_path / "unzipped" / "tiny-imagenet-200"):
    again = sources.load(str(folder))
    for a, b in ((data.train, again.train), (data.test, again.test)):
      np.testing.assert_array_equal(a[0], b[0])
      np.testing.assert_array_equal(a[1], b[1])


def test_bad_archives_are_one_clear_error(tmp_path):
  (tmp_path / "broken.zip").write_bytes(b"not a zip")
  with pytest.raises(UserError, match=r"broken.zip: not a readable zip"):
    sources.load(str(tmp_path / "broken.zip"))
  with pytest.raises(UserError, match=r"no wnids.txt inside"):
    sources.load(str(_zip(tmp_path / "other.zip", {"readme.txt": "x"})))
  files = _files()
  files["val/val_annotations.txt"] += "val_9.JPEG\tn12345678\t0\t0\t1\t1\n"
  with pytest.raises(UserError, match=r"labels val_9.JPEG with 'n12345678'"):
    sources.load(str(_zip(tmp_path / "a.zip", files)))
  files = _files()
  del files["words.txt"]
  with pytest.raises(UserError, match=r"no words.txt; expected the official layout"):
    sources.load(str(_zip(tmp_path / "b.zip", files)))
  files = _files()
  files["train/n01443537/images/n01443537_0.JPEG"] = b"\xff\xd8 truncated"
  with pytest.raises(UserError, match=r"n01443537_0.JPEG: cannot decode it"):
    sources.load(str(_zip(tmp_path / "c.zip", files)))


def test_the_name_downloads_on_first_use_and_offline_fails_fast(tmp_path, monkeypatch):
  from cnnjax.data import tfds_builders
  payload = (_zip(tmp_path / "served.zip", _files())).read_bytes()

  class Response(io.BytesIO):
    headers = {"Content-Length": str(len(payload))}

    def __enter__(self):
      return self

    def __exit__(self, *exc):
      self.close()

  opened = []
  monkeypatch.setattr(tfds_builders, "_unreachable", lambda url: None)
  monkeypatch.setattr(tiny_imagenet.urllib.request, "urlopen",
                      lambda url, timeout: opened.append(url) or Response(payload))
  data_dir = tmp_path / "tfds"
  data = sources.load("tiny_imagenet", data_dir=str(data_dir))
  assert opened == [tiny_imagenet.URL] and len(data.train[1]) == 12
  assert sorted(p.name for p in (data_dir / "downloads").iterdir()) == ["tiny-imagenet-200.zip"]
  sources.load("tiny_imagenet", data_dir=str(data_dir))
  assert len(opened) == 1  # the second time from the downloaded copy

  monkeypatch.setattr(tfds_builders, "_unreachable", lambda url: "URLError: no network")
  start = time.monotonic()
  with pytest.raises(UserError, match=r"cannot download Tiny ImageNet .* \(URLError: no "
                     r"network\); offline, pass a local copy"):
    sources.load("tiny_imagenet", data_dir=str(tmp_path / "empty"))
  assert time.monotonic() - start < 5
  assert not (tmp_path / "empty").exists()

  def broken(url, timeout):
    raise OSError("connection reset")
  monkeypatch.setattr(tfds_builders, "_unreachable", lambda url: None)
  monkeypatch.setattr(tiny_imagenet.urllib.request, "urlopen", broken)
  with pytest.raises(UserError, match=r"download of .* failed \(OSError: connection reset\)"):
    sources.load("tiny_imagenet", data_dir=str(tmp_path / "again"))
  assert list((tmp_path / "again" / "downloads").iterdir()) == []  # no partial file left


@pytest.mark.slow
def test_the_r_notebooks_cnn_trains_on_it(tmp_path):
  path = _zip(tmp_path / "tiny-imagenet-200.zip", _files(train_per_class=8))
  config = tiny_config(str(path), batch_size=8, num_epochs=1)
  config.model.update({"name": "tiny_imagenet_cnn", "num_classes": 3, "widths": (4, 8, 8, 8, 8),
                       "hidden": (8,)})
  config.data.augment.crop_padding = 4
  metrics = train.train_and_evaluate(config, str(tmp_path / "run"))
  assert sum(metrics["support"]) == 6 and 0 <= metrics["accuracy"] <= 1
