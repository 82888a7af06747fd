"""Tests for cnnjax.data.augment: geometry, fill modes, randomness, resize and config checks."""
import numpy as np
import pytest
import scipy.ndimage as ndi
from PIL import Image

from cnnjax.data import augment
from cnnjax.errors import UserError

KERAS_CFG = dict(rotation=40, width_shift=0.2, height_shift=0.2, shear=0.2, zoom=0.2,
                 horizontal_flip=True, fill_mode="nearest")


def _random_images(shape=(4, 9, 7, 3), seed=0, low=0):
  return np.random.default_rng(seed).integers(low, 256, shape, dtype=np.uint8)


def _dot(h, w, r, c, value=255):
  """A [1, h, w, 1] black image with one pixel set at (r, c)."""
  x = np.zeros((1, h, w, 1), np.uint8)
  x[0, r, c, 0] = value
  return x


def _scipy_warp(image, matrix, mode, cval, order):
  """scipy.ndimage reference for one [H, W, C] image, rounded like augment."""
  out = np.stack([ndi.affine_transform(image[..., ch].astype(np.float64), matrix[:, :2],
                                       matrix[:, 2], order=order, mode=mode, cval=cval)
                  for ch in range(image.shape[-1])], axis=-1)
  return np.floor(out + 0.5)


@pytest.mark.parametrize("order", [0, 1])
@pytest.mark.parametrize("fill_mode", augment.FILL_MODES)
def test_identity_matrix_and_zero_ranges_leave_images_unchanged(fill_mode, order):
  x = _random_images()
  identity = augment.affine_matrices(9, 7)
  np.testing.assert_allclose(identity[0], [[1, 0, 0], [0, 1, 0]], atol=1e-12)
  np.testing.assert_array_equal(augment.affine_warp(x, identity, fill_mode, 0, order), x)
  rng = np.random.default_rng(0)
  np.testing.assert_array_equal(
      augment.random_affine(x, rng, fill_mode=fill_mode, order=order), x)
  np.testing.assert_array_equal(augment.augment_batch(x, rng, fill_mode=fill_mode), x)


@pytest.mark.parametrize("order", [0, 1])
@pytest.mark.parametrize("fill_mode", augment.FILL_MODES)
@pytest.mark.parametrize("side", [5, 6])
def test_rotate_by_quarter_turns_equals_rot90_counter_clockwise(side, fill_mode, order):
  x = _random_images((3, side, side, 2))
  rot = lambda k: np.rot90(x, k, axes=(1, 2))  # k > 0: counter-clockwise.
  np.testing.assert_array_equal(augment.rotate(x, 90, fill_mode, order=order), rot(1))
  np.testing.assert_array_equal(augment.rotate(x, -90, fill_mode, order=order), rot(-1))
  per_image = augment.rotate(x, np.array([90.0, 180.0, -90.0]), fill_mode, order=order)
  np.testing.assert_array_equal(per_image, np.stack([rot(1)[0], rot(2)[1], rot(-1)[2]]))


def test_rotation_fills_corners_with_fill_value():
  x = np.full((2, 28, 28, 1), 200, np.uint8)
  out = augment.rotate(x, 45.0)  # constant fill, 0 by default: MNIST robustness set-up.
  assert (out[:, 0, 0] == 0).all() and (out[:, -1, -1] == 0).all()
  assert (out[:, 10:18, 10:18] == 200).all()


@pytest.mark.parametrize("order", [0, 1])
def test_shift_moves_a_bright_pixel_down_and_right(order):
  x = _dot(9, 9, 3, 4)
  m = augment.affine_matrices(9, 9, shift_y=2, shift_x=-3)
  out = augment.affine_warp(x, m, "constant", 0, order)
  np.testing.assert_array_equal(out, _dot(9, 9, 5, 1))


def test_random_height_shift_moves_vertically_within_range():
  x = np.repeat(_dot(10, 10, 5, 5), 64, axis=0)
  out = augment.random_affine(x, np.random.default_rng(1), height_shift=0.3,
                              fill_mode="constant", order=0)
  image, r, c = np.nonzero(out[..., 0])
  np.testing.assert_array_equal(image, np.arange(64))  # One pixel per image, none lost.
  assert (c == 5).all()  # Only the row changes.
  dy = r - 5
  assert np.abs(dy).max() <= 3 and len(set(dy.tolist())) > 3


def test_zoom_factor_below_one_enlarges_and_above_one_shrinks():
  x = np.zeros((1, 10, 10, 1), np.uint8)
  x[0, 3:7, 3:7] = 255  # A centred 4x4 square.
  warp = lambda zy, zx: augment.affine_warp(
      x, augment.affine_matrices(10, 10, zoom_y=zy, zoom_x=zx), "constant", 0, 0)[0, ..., 0]
  enlarged = warp(0.5, 0.5)  # Keras' factor is the source step: < 1 zooms in.
  assert (enlarged == 255).sum() == 64 and (enlarged[1:9, 1:9] == 255).all()
  assert (warp(2.0, 2.0) == 255).sum() == 4
  tall = warp(0.5, 1.0)
  assert (tall == 255).sum() == 32 and (tall[1:9, 3:7] == 255).all()


def test_fill_modes_give_expected_border_values():
  row = np.array([10, 20, 30, 40], np.uint8).reshape(1, 1, 4, 1)
  m = augment.affine_matrices(1, 4, shift_x=2)  # Content moves 2 pixels right.
  expected = {"constant": [9, 9, 10, 20], "nearest": [10, 10, 10, 20],
              "reflect": [20, 10, 10, 20], "wrap": [30, 40, 10, 20]}
  for mode, values in expected.items():
    for order in (0, 1):
      out = augment.affine_warp(row, m, mode, 9, order)
      np.testing.assert_array_equal(out.ravel(), values, err_msg=f"{mode} order={order}")


@pytest.mark.parametrize("order", [0, 1])
@pytest.mark.parametrize("fill_mode", augment.FILL_MODES)
def test_fill_modes_match_scipy_affine_transform(fill_mode, order):
  x = _random_images((2, 4, 5, 2))
  # A zoom of 2.7 reaches source points more than one period outside the image.
  m = augment.affine_matrices(4, 5, rotation=[33.0, -71.0], shift_y=[0.7, 1.9],
                              shift_x=[-1.3, 0.4], shear=[8.0, -12.0], zoom_y=[2.7, 0.6],
                              zoom_x=[1.3, 2.2])
  scipy_mode = "grid-wrap" if fill_mode == "wrap" else fill_mode  # Keras' documented wrap.
  out = augment.affine_warp(x, m, fill_mode, 17, order)
  for i in range(2):
    np.testing.assert_array_equal(out[i], _scipy_warp(x[i], m[i], scipy_mode, 17, order))


def test_matrices_match_keras_apply_affine_transform_on_square_images():
  """Keras builds R @ T @ S @ Z in (x, y), centres it at (h/2-.5, w/2-.5), then swaps axes."""
  theta, tx, ty, shear, zx, zy, n = 30.0, 2.5, -1.5, 12.0, 1.1, 0.85, 16
  t, s = np.deg2rad(theta), np.deg2rad(shear)
  keras = (np.array([[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0], [0, 0, 1]])
           @ np.array([[1, 0, tx], [0, 1, ty], [0, 0, 1]])
           @ np.array([[1, -np.sin(s), 0], [0, np.cos(s), 0], [0, 0, 1]])
           @ np.diag([zx, zy, 1.0]))
  o = n / 2 - 0.5
  keras = (np.array([[1, 0, o], [0, 1, o], [0, 0, 1]]) @ keras
           @ np.array([[1, 0, -o], [0, 1, -o], [0, 0, 1]]))
  keras = keras[[1, 0]][:, [1, 0, 2]]  # Keras' x/y swap: now (row, col).
  # Keras' positive tx samples further right, so the content moves left.
  ours = augment.affine_matrices(n, n, rotation=theta, shift_y=-ty, shift_x=-tx, shear=shear,
                                 zoom_y=zy, zoom_x=zx)
  np.testing.assert_allclose(ours[0], keras, atol=1e-12)


def test_same_seed_same_result_and_different_seeds_differ():
  x = _random_images((8, 16, 16, 3))
  run = lambda seed: augment.augment_batch(x, np.random.default_rng(seed), crop_padding=2,
                                           **KERAS_CFG)
  np.testing.assert_array_equal(run(3), run(3))
  assert not np.array_equal(run(3), run(4))
  assert not np.array_equal(run(3), x)


def test_keras_augment_composes_affine_crop_flip_in_order():
  x = _random_images((8, 16, 16, 3))
  out = augment.KerasAugment(crop_padding=2, **KERAS_CFG)(x, np.random.default_rng(5))
  rng = np.random.default_rng(5)
  manual = augment.random_affine(x, rng, 40, 0.2, 0.2, 0.2, 0.2, "nearest")
  manual = augment.random_flip(augment.random_crop(manual, rng, 2), rng)
  np.testing.assert_array_equal(out, manual)


def test_random_rotation_draws_angles_in_range():
  x = _random_images((6, 11, 11, 1))
  out = augment.random_rotation(x, np.random.default_rng(2), 25.0)
  angles = np.random.default_rng(2).uniform(-25.0, 25.0, 6)
  np.testing.assert_array_equal(out, augment.rotate(x, angles))
  np.testing.assert_array_equal(augment.random_rotation(x, np.random.default_rng(2), 0.0), x)


def test_shapes_and_dtypes_are_preserved():
  x = _random_images((3, 7, 5, 2))
  rng = np.random.default_rng(0)
  outputs = [augment.random_affine(x, rng, 30, 0.1, 0.2, 10, 0.3, "reflect"),
             augment.rotate(x, 17.0), augment.random_rotation(x, rng, 25),
             augment.random_crop(x, rng, 2), augment.random_flip(x, rng),
             augment.augment_batch(x, rng, crop_padding=1, **KERAS_CFG)]
  for out in outputs:
    assert out.shape == x.shape and out.dtype == np.uint8
  assert augment.resize(x, 11).shape == (3, 11, 11, 2)
  assert augment.resize(x, 11).flags.c_contiguous
  assert augment.resize(x, (4, 9)).dtype == np.uint8


def test_resize_keeps_constant_images_constant():
  x = np.full((2, 5, 7, 3), 173, np.uint8)
  for size in (3, 16, (9, 2)):
    assert (augment.resize(x, size) == 173).all()


def test_resize_checker_2x2_to_4x4():
  x = np.array([[0, 255], [255, 0]], np.uint8).reshape(1, 2, 2, 1)
  # Half-pixel centres: output i samples source (i + 0.5) / 2 - 0.5, clamped to the edge, so
  # the weight on source pixel 1 is p = [0, 1/4, 3/4, 1]; value = 255 * (p_r (1 - p_c) + ...).
  p = np.array([0.0, 0.25, 0.75, 1.0])
  expected = 255 * (p[:, None] * (1 - p[None, :]) + (1 - p[:, None]) * p[None, :])
  np.testing.assert_array_equal(augment.resize(x, 4)[0, ..., 0], np.floor(expected + 0.5))
  assert augment.resize(x, 4)[0, 1, 1, 0] == 96  # 255 * 0.375 = 95.6.


@pytest.mark.parametrize("size", [(24, 20), (5, 4), (7, 13)])
def test_resize_matches_pil_bilinear(size):
  x = _random_images((1, 12, 10, 1))
  image = Image.fromarray(x[0, ..., 0].astype(np.float32), mode="F")
  ref = np.asarray(image.resize(size[::-1], Image.BILINEAR))
  out = augment.resize(x, size)[0, ..., 0].astype(np.float64)
  assert np.abs(out - ref).max() <= 0.5 + 1e-3  # PIL's float result, before rounding.


def test_random_flip_is_a_per_image_involution():
  x = _random_images((32, 4, 5, 2))
  once = augment.random_flip(x, np.random.default_rng(7))
  twice = augment.random_flip(once, np.random.default_rng(7))
  np.testing.assert_array_equal(twice, x)
  flipped = [np.array_equal(o, i[:, ::-1]) for o, i in zip(once, x)]
  kept = [np.array_equal(o, i) for o, i in zip(once, x)]
  assert all(f or k for f, k in zip(flipped, kept)) and any(flipped) and any(kept)


def test_random_crop_only_shifts_by_at_most_padding():
  p = 2
  x = _random_images((16, 8, 8, 1), low=1)  # No zeros: a zero marks padding.
  out = augment.random_crop(x, np.random.default_rng(3), p)
  padded = np.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
  shifts = []
  for o, pad in zip(out, padded):
    found = [(dy, dx) for dy in range(2 * p + 1) for dx in range(2 * p + 1)
             if np.array_equal(o, pad[dy:dy + 8, dx:dx + 8])]
    assert len(found) == 1
    shifts.append(found[0])
  dys, dxs = zip(*shifts)
  assert len(set(dys)) > 2 and len(set(dxs)) > 2  # Both offsets are random.
  np.testing.assert_array_equal(augment.random_crop(x, np.random.default_rng(3), 0), x)


@pytest.mark.parametrize("config, words", [
    (dict(rotate=10), ["'rotate'", "rotation", "crop_padding"]),
    (dict(rotation=-5), ["rotation=-5", "[0.0, 180.0]"]),
    (dict(width_shift=1.0), ["width_shift=1.0", "[0.0, 1.0)"]),
    (dict(height_shift=-0.1), ["height_shift=-0.1"]),
    (dict(shear=90), ["shear=90"]),
    (dict(zoom=1.5), ["zoom=1.5"]),
    (dict(fill_mode="mirror"), ["'mirror'", "constant, nearest, reflect, wrap"]),
    (dict(horizontal_flip="yes"), ["horizontal_flip='yes'"]),
    (dict(crop_padding=1.5), ["crop_padding=1.5"]),
    (dict(fill_value=256), ["fill_value=256"]),
])
def test_bad_config_raises_one_line_user_error(config, words):
  with pytest.raises(UserError) as info:
    augment.augment_batch(_random_images(), np.random.default_rng(0), **config)
  message = str(info.value)
  assert "\n" not in message and all(w in message for w in words), message


def test_bad_arguments_raise_user_error():
  x = _random_images()
  rng = np.random.default_rng(0)
  bad_calls = [
      lambda: augment.random_affine(x.astype(np.float32), rng, rotation=10),
      lambda: augment.random_affine(x[0], rng, rotation=10),
      lambda: augment.random_affine(x, rng, order=3),
      lambda: augment.rotate(x, np.zeros(3)),
      lambda: augment.rotate(x, np.nan),
      lambda: augment.rotate(x, "90"),
      lambda: augment.affine_warp(x, np.zeros((2, 2, 3))),
      lambda: augment.random_rotation(x, rng, -1),
      lambda: augment.resize(x, 0),
      lambda: augment.resize(x, (4,)),
      lambda: augment.random_crop(x, rng, -1),
  ]
  for call in bad_calls:
    with pytest.raises(UserError):
      call()
