"""cnnjax.plots: each function writes a PNG that PIL can open, of a plausible size."""
import numpy as np
import pytest
from PIL import Image

from cnnjax import plots
from cnnjax.errors import UserError


def _open_png(path) -> np.ndarray:
  """Checks ``path`` is a non-empty PNG of plausible size; returns it as ``[H, W, 3]`` uint8."""
  assert path.stat().st_size > 1000
  with Image.open(path) as image:
    assert image.format == "PNG"
    width, height = image.size
    assert 150 <= width <= 5000 and 150 <= height <= 5000, image.size
    return np.asarray(image.convert("RGB"))


def _red_pixels(pixels: np.ndarray) -> int:
  """Number of strongly red pixels in ``[H, W, 3]`` uint8."""
  r, g, b = (pixels[..., i].astype(int) for i in range(3))
  return int(((r > 180) & (g < 90) & (b < 90)).sum())


def _history(val: bool, lr: bool) -> list[dict[str, float]]:
  history = []
  for epoch in range(1, 6):
    row = {"epoch": epoch, "train_loss": 2.0 / epoch, "train_accuracy": 1 - 0.5 / epoch}
    if val and epoch % 2 == 1:  # validated every other epoch
      row.update(val_loss=2.2 / epoch, val_accuracy=1 - 0.6 / epoch)
    if lr:
      row["lr"] = 0.1 * 0.5**epoch
    history.append(row)
  return history


@pytest.mark.parametrize("val", [False, True])
def test_plot_curves(tmp_path, val):
  without_lr = plots.plot_curves(_history(val, lr=False), tmp_path / "sub" / "a.png")
  with_lr = plots.plot_curves(_history(val, lr=True), tmp_path / "b.png")
  assert without_lr == tmp_path / "sub" / "a.png"
  two_panels, three_panels = _open_png(without_lr), _open_png(with_lr)
  assert three_panels.shape[1] > 1.3 * two_panels.shape[1]  # the learning-rate panel
  assert three_panels.shape[0] == two_panels.shape[0]


@pytest.mark.parametrize("history, match", [
    ([], "expected a non-empty list"),
    ([{"epoch": 1, "train_loss": 1.0}], r"history\[0\] lacks \['train_accuracy'\]"),
])
def test_plot_curves_rejects_bad_history(tmp_path, history, match):
  with pytest.raises(UserError, match=match):
    plots.plot_curves(history, tmp_path / "x.png")


@pytest.mark.parametrize("normalize", [True, False])
def test_plot_confusion(tmp_path, normalize):
  cm = np.array([[5, 1, 0], [2, 7, 1], [0, 0, 0]])  # last class has no examples
  path = plots.plot_confusion(cm, ["cat", "dog", "frog"], tmp_path / "cm.png", normalize)
  assert path == tmp_path / "cm.png"
  _open_png(path)


@pytest.mark.slow
def test_plot_confusion_large_is_bounded(tmp_path):
  rng = np.random.default_rng(0)
  cm = rng.integers(0, 20, size=(100, 100))
  _open_png(plots.plot_confusion(cm, [f"c{i}" for i in range(100)], tmp_path / "cm.png"))


def test_plot_confusion_rejects_wrong_names(tmp_path):
  with pytest.raises(UserError, match="class_names has 2 entries; expected 3"):
    plots.plot_confusion(np.eye(3, dtype=int), ["a", "b"], tmp_path / "cm.png")


@pytest.mark.parametrize("channels, dtype", [(1, np.uint8), (3, np.uint8), (3, np.float32)])
def test_image_grid(tmp_path, channels, dtype):
  rng = np.random.default_rng(0)
  gray = rng.integers(0, 256, size=(10, 16, 16, 1), dtype=np.uint8)
  images = np.repeat(gray, channels, axis=-1)
  if dtype == np.float32:
    images = images.astype(np.float32) / 255
  titles = [f"true: cat / pred: {'dog' if i % 3 == 0 else 'cat'}" for i in range(10)]
  mistakes = np.arange(10) % 3 == 0

  plain = _open_png(plots.image_grid(images, tmp_path / "plain.png", ncols=4))
  marked = _open_png(
      plots.image_grid(images, tmp_path / "marked.png", titles=titles, mistakes=mistakes,
                       ncols=4))
  one_row = _open_png(plots.image_grid(images[:4], tmp_path / "row.png", ncols=4))
  assert plain.shape[0] > 2 * one_row.shape[0]  # 3 rows of 4 vs 1 row
  assert _red_pixels(plain) == 0  # grey images, no mistakes marked: nothing red
  assert _red_pixels(marked) > 100  # red frames and titles on the 4 mistakes


@pytest.mark.parametrize("images, kwargs, match", [
    (np.zeros((2, 8, 8, 2), np.uint8), {}, r"shape \(2, 8, 8, 2\)"),
    (np.full((2, 8, 8, 3), 2.0), {}, r"span \[2, 2\]; expected values in \[0, 1\]"),
    (np.zeros((2, 8, 8, 3), np.int32), {}, "dtype int32"),
    (np.zeros((2, 8, 8, 3), np.uint8), {"titles": ["a"]}, "titles has 1 entries"),
    (np.zeros((2, 8, 8, 3), np.uint8), {"mistakes": [1, 0]}, "mistakes has shape"),
    (np.zeros((2, 8, 8, 3), np.uint8), {"ncols": 0}, "ncols=0"),
])
def test_image_grid_rejects_bad_input(tmp_path, images, kwargs, match):
  with pytest.raises(UserError, match=match):
    plots.image_grid(images, tmp_path / "g.png", **kwargs)


def test_curves_show_the_per_step_rate_and_no_panel_for_a_constant_one():
  rows = [{"epoch": e, "train_loss": 1.0 / e, "train_accuracy": 0.5, "lr": 1e-3} for e in (1, 2)]
  assert len(plots.curves_figure(rows).axes) == 2  # constant: no learning-rate panel
  cycle = np.concatenate([np.linspace(1e-4, 1e-3, 5), np.linspace(1e-3, 1e-6, 15)])
  fig = plots.curves_figure(rows, step_lrs=cycle)
  lr_axis = fig.axes[2]
  assert lr_axis.get_title() == "Learning rate per step" and len(lr_axis.lines[0].get_xdata()) == 20
  assert lr_axis.lines[0].get_xdata()[-1] == 2.0


def test_image_grid_title_size_and_colour_bar():
  images = np.zeros((2, 8, 8, 3), np.uint8)
  fig = plots.image_grid(images, None, titles=["a", "b"], title="what it shows", cell=3.2,
                         colorbar="relevance")
  assert fig._suptitle.get_text() == "what it shows" and len(fig.axes) == 3  # 2 images + bar
  assert fig.axes[-1].get_ylabel() == "relevance" and fig.get_size_inches()[0] > 6.4
