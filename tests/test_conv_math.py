"""Tests of cnnjax.conv_math against jax.lax and flax.linen, and of experiments.conv_demo."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from cnnjax import conv_math
from cnnjax.errors import UserError
from experiments import conv_demo

ATOL = 1e-5


def _lax_conv(x: np.ndarray, w: np.ndarray, stride: int, padding: int) -> np.ndarray:
  out = jax.lax.conv_general_dilated(
      x, w, window_strides=(stride, stride), padding=((padding, padding), (padding, padding)),
      dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=jax.lax.Precision.HIGHEST)
  return np.asarray(out)


def _random_conv_inputs(seed: int, shape: tuple[int, ...],
                        kernel: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
  rng = np.random.default_rng(seed)
  x = rng.standard_normal(shape, dtype=np.float32)
  w = rng.standard_normal(kernel, dtype=np.float32) / np.sqrt(np.prod(kernel[:3]))
  return x, w.astype(np.float32)


# The course's table: (input side, kernel, stride, padding, output side). The course lists
# 175 for the last row, but floor((528 + 4 - 7) / 3) + 1 = 176, and flax agrees (175 would
# need padding 1).
COURSE_TABLE = [(30, 3, 1, 0, 28), (224, 5, 2, 1, 111), (528, 7, 3, 2, 176)]


@pytest.mark.parametrize("n,kernel,stride,padding,expected", COURSE_TABLE)
def test_conv_output_size_matches_course_table_and_flax_conv(n, kernel, stride, padding,
                                                             expected):
  assert conv_math.conv_output_size(n, kernel, stride, padding) == expected
  conv = nn.Conv(features=2, kernel_size=(kernel, kernel), strides=(stride, stride),
                 padding=((padding, padding), (padding, padding)))
  x = jax.ShapeDtypeStruct((1, n, n, 3), jnp.float32)
  out, _ = jax.eval_shape(lambda x: conv.init_with_output(jax.random.key(0), x), x)
  assert out.shape == (1, expected, expected, 2)


@pytest.mark.parametrize("args,match", [
    ((4, 7, 1, 1), "kernel size 7 is larger than the padded input 4"),
    ((8, 3, 0, 0), "stride must be a positive integer, got 0"),
    ((8, 3, -2, 0), "stride must be a positive integer, got -2"),
    ((8, 3, 1, -1), "padding must be >= 0, got -1"),
    ((0, 3, 1, 1), "input size must be a positive integer, got 0"),
    ((8, 0, 1, 0), "kernel size must be a positive integer, got 0"),
])
def test_conv_output_size_rejects_impossible_combinations(args, match):
  with pytest.raises(UserError, match=match):
    conv_math.conv_output_size(*args)


def test_kernel_equal_to_padded_input_gives_one_output():
  assert conv_math.conv_output_size(4, 6, 1, 1) == 1


@pytest.mark.parametrize("n,window,stride,padding", [(28, 2, None, 0), (7, 3, 2, 1),
                                                     (9, 2, None, 0)])
def test_pool_output_size_matches_flax_max_pool(n, window, stride, padding):
  strides = (window, window) if stride is None else (stride, stride)
  x = jax.ShapeDtypeStruct((1, n, n, 1), jnp.float32)
  out = jax.eval_shape(lambda x: nn.max_pool(x, (window, window), strides,
                                             ((padding, padding), (padding, padding))), x)
  expected = conv_math.pool_output_size(n, window, stride, padding)
  assert out.shape == (1, expected, expected, 1)


CONV_CASES = [  # (x shape, kernel shape, stride, padding)
    ((2, 7, 7, 3), (3, 3, 3, 4), 1, 0),
    ((2, 8, 9, 3), (3, 3, 3, 5), 2, 1),
    ((1, 9, 8, 2), (2, 3, 2, 3), 3, 2),
    ((3, 6, 6, 1), (1, 2, 1, 2), 1, 0),
]


@pytest.mark.parametrize("x_shape,w_shape,stride,padding", CONV_CASES)
def test_conv2d_loops_and_patches_match_lax(x_shape, w_shape, stride, padding):
  x, w = _random_conv_inputs(sum(x_shape), x_shape, w_shape)
  expected = _lax_conv(x, w, stride, padding)
  b, h, wd, _ = x_shape
  oh = conv_math.conv_output_size(h, w_shape[0], stride, padding)
  ow = conv_math.conv_output_size(wd, w_shape[1], stride, padding)
  assert expected.shape == (b, oh, ow, w_shape[3])
  loops = conv_math.conv2d_loops(x, w, stride, padding)
  patches = conv_math.conv2d_patches(x, w, stride, padding)
  assert loops.dtype == np.float32 and patches.dtype == jnp.float32
  np.testing.assert_allclose(loops, expected, atol=ATOL, rtol=0)
  np.testing.assert_allclose(np.asarray(patches), expected, atol=ATOL, rtol=0)


def test_extract_patches_order_matches_hwio_reshape():
  x = np.arange(2 * 4 * 5 * 3, dtype=np.float32).reshape(2, 4, 5, 3)
  patches = np.asarray(conv_math.extract_patches(x, 2, 3, stride=2, padding=1))
  assert patches.shape == (2, 3, 3, 2 * 3 * 3)
  padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  np.testing.assert_array_equal(patches[1, 1, 2], padded[1, 2:4, 4:7, :].reshape(-1))


def test_conv2d_rejects_channel_mismatch_and_bad_rank():
  x = np.zeros((1, 5, 5, 3), np.float32)
  with pytest.raises(UserError, match="kernel input channels 2"):
    conv_math.conv2d_patches(x, np.zeros((3, 3, 2, 4), np.float32))
  with pytest.raises(UserError, match="kernel input channels 2"):
    conv_math.conv2d_loops(x, np.zeros((3, 3, 2, 4), np.float32))
  with pytest.raises(UserError, match=r"input must have 4 dimensions"):
    conv_math.conv2d_loops(x[0], np.zeros((3, 3, 3, 4), np.float32))
  with pytest.raises(UserError, match="kernel size 9 is larger than the padded input 5"):
    conv_math.conv2d_patches(x, np.zeros((9, 9, 3, 1), np.float32))


POOL_CASES = [(2, None, 0), (3, 2, 1), (3, 1, 0), (2, 3, 1)]  # (window, stride, padding)


@pytest.mark.parametrize("window,stride,padding", POOL_CASES)
def test_pools_match_flax(window, stride, padding):
  x = np.random.default_rng(window + 10 * padding).standard_normal((2, 9, 8, 3), np.float32)
  strides = (window, window) if stride is None else (stride, stride)
  pad = ((padding, padding), (padding, padding))
  expected_max = nn.max_pool(x, (window, window), strides, pad)
  expected_avg = nn.avg_pool(x, (window, window), strides, pad)
  np.testing.assert_allclose(conv_math.max_pool2d(x, window, stride, padding), expected_max,
                             atol=ATOL, rtol=0)
  np.testing.assert_allclose(conv_math.avg_pool2d(x, window, stride, padding), expected_avg,
                             atol=ATOL, rtol=0)


def test_max_pool_padding_never_wins_on_negative_inputs():
  x = -np.ones((1, 2, 2, 1), np.float32)
  np.testing.assert_array_equal(conv_math.max_pool2d(x, 2, 1, padding=1), -np.ones((1, 3, 3, 1)))


def _square_image() -> np.ndarray:
  """[8, 8] zeros with a bright 4x4 square: vertical edges in both directions."""
  image = np.zeros((8, 8), np.float32)
  image[2:6, 2:6] = 1.0
  return image


def test_learn_kernel_recovers_edge_kernel():
  image = _square_image()
  edge = np.array([[1.0, -1.0]], np.float32)
  target = conv_math.conv2d_loops(image[None, :, :, None], edge[:, :, None, None])[0, :, :, 0]
  kernel, losses = conv_math.learn_kernel(image, target, kernel_shape=(1, 2))
  assert kernel.shape == (1, 2) and losses.shape == (300,)
  np.testing.assert_allclose(kernel, edge, atol=1e-2)
  assert losses[-1] < 1e-3 * losses[0]


def test_learn_kernel_rejects_mismatched_target():
  with pytest.raises(UserError, match=r"target shape \(8, 8\) .* expected \(8, 7\)"):
    conv_math.learn_kernel(_square_image(), np.zeros((8, 8), np.float32))


def test_box_blur_and_gaussian_kernel_properties():
  box = conv_math.box_blur(3)
  np.testing.assert_allclose(box, np.full((3, 3), 1 / 9), rtol=1e-6)
  g = conv_math.gaussian_kernel(7, 1.5)
  assert g.shape == (7, 7)
  np.testing.assert_allclose(g.sum(), 1.0, rtol=1e-6)
  np.testing.assert_allclose(g, g.T, rtol=1e-6)
  np.testing.assert_allclose(g, g[::-1, ::-1], rtol=1e-6)
  assert np.unravel_index(g.argmax(), g.shape) == (3, 3)
  assert np.all(np.diff(g[3, 3:]) < 0)  # decreases away from the centre
  # Variance of the centre row's normalised profile is close to sigma**2 for a wide kernel.
  row = conv_math.gaussian_kernel(41, 3.0)[20]
  d = np.arange(41) - 20
  np.testing.assert_allclose(np.sum(row / row.sum() * d**2), 9.0, rtol=1e-3)


@pytest.mark.parametrize("call,match", [
    (lambda: conv_math.box_blur(0), "box blur size must be a positive integer, got 0"),
    (lambda: conv_math.gaussian_kernel(5, 0.0), "gaussian sigma must be > 0, got 0.0"),
    (lambda: conv_math.gaussian_kernel(0, 1.0), "gaussian kernel size must be a positive"),
    (lambda: conv_math.apply_kernel(np.zeros((1, 4, 4, 3)), conv_math.box_blur(3)),
     r"image must have shape \[H, W\] or \[H, W, C\], got \(1, 4, 4, 3\)"),
    (lambda: conv_math.apply_kernel(np.zeros((4, 4)), np.zeros((3, 3, 1, 1))),
     r"kernel must have 2 dimensions"),
])
def test_kernel_helpers_reject_bad_input(call, match):
  with pytest.raises(UserError, match=match):
    call()


def test_apply_kernel_is_channel_wise_same_padded_cross_correlation():
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (6, 7, 3), dtype=np.uint8)
  kernel = rng.standard_normal((3, 3)).astype(np.float32)  # asymmetric: catches a flip
  out = conv_math.apply_kernel(image, kernel)
  assert out.shape == image.shape and out.dtype == np.float32
  for c in range(3):
    expected = conv_math.conv2d_loops(image[None, :, :, c:c + 1].astype(np.float32),
                                      kernel[:, :, None, None], padding=1)[0, :, :, 0]
    np.testing.assert_allclose(out[:, :, c], expected, rtol=1e-5, atol=1e-3)


def test_apply_kernel_on_greyscale_identity_blur_and_edges():
  image = np.random.default_rng(1).random((5, 6)).astype(np.float32)
  identity = np.zeros((3, 3), np.float32)
  identity[1, 1] = 1.0
  np.testing.assert_allclose(conv_math.apply_kernel(image, identity), image, atol=1e-6)
  # An even kernel pads (K-1)//2 = 0 before and K//2 = 1 after, like XLA's 'SAME'.
  padded = np.pad(image, ((0, 1), (0, 1)))
  expected = (padded[:-1, :-1] + padded[1:, :-1] + padded[:-1, 1:] + padded[1:, 1:]) / 4
  np.testing.assert_allclose(conv_math.apply_kernel(image, conv_math.box_blur(2)), expected,
                             atol=1e-6)
  flat = np.full((6, 6), 7.0, np.float32)
  # Away from the zero-padded border a blur keeps a flat image and the Laplacian zeroes it.
  np.testing.assert_allclose(conv_math.apply_kernel(flat, conv_math.gaussian_kernel(3, 1.0))
                             [1:-1, 1:-1], 7.0, rtol=1e-5)
  edges = conv_math.apply_kernel(flat, conv_math.edge_kernel())
  np.testing.assert_allclose(edges[1:-1, 1:-1], 0.0, atol=1e-5)
  assert edges[0, 0] == pytest.approx(7.0 * 5)  # corner: 3 of its 8 neighbours are padding


def test_conv_demo_writes_png(tmp_path, capsys):
  with pytest.raises(SystemExit) as exit_info:
    conv_demo.cli(["conv_demo", "--out", str(tmp_path / "demo"), "--sigma", "1"])
  assert exit_info.value.code == 0
  path = tmp_path / "demo" / "conv_demo.png"
  assert capsys.readouterr().out.strip() == str(path)
  assert path.stat().st_size > 0
  with Image.open(path) as png:
    assert png.format == "PNG" and png.width > png.height > 100


def test_conv_demo_rejects_bad_sigma(tmp_path, capsys):
  with pytest.raises(SystemExit) as exit_info:
    conv_demo.cli(["conv_demo", "--out", str(tmp_path), "--sigma", "-1"])
  assert exit_info.value.code == 2
  assert capsys.readouterr().err == "error: --sigma must be a finite number > 0, got -1.0\n"
