"""Looking inside models: Grad-CAM and CAM against hand computations on hand-built models,
activations, filters, gradient ascent, and the pictures of a one-epoch run."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from cnnjax import assemble, interpret
from cnnjax.errors import UserError
from cnnjax.models.blocks import pool
from experiments.configs import default


class TopRightMask(nn.Module):
  """Zeroes a ``[B, H, W, C]`` map everywhere but its top-right quadrant."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    h, w = x.shape[1:3]
    keep = (jnp.arange(h)[:, None] < h // 2) & (jnp.arange(w)[None, :] >= w // 2)
    return x * keep[None, :, :, None]


class Masked(nn.Module):
  """1x1 conv + ReLU, 2x2 average pooling, the top-right mask, global average, dense:
  ``[B, 16, 16, 2]`` -> logits ``[B, 2]`` that depend on the top-right quadrant only."""

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    del train
    x = pool(nn.relu(nn.Conv(2, (1, 1), name="conv")(x)), "avg", 2)
    x = TopRightMask(name="mask")(x)
    return nn.Dense(2, name="head")(x.mean(axis=(1, 2)))


# Channel k passes through the conv unchanged; class 0 scores channel 0 against channel 1,
# class 1 the reverse.
MASKED_VARIABLES = {"params": {
    "conv": {"kernel": np.eye(2, dtype=np.float32)[None, None], "bias": np.zeros(2, np.float32)},
    "head": {"kernel": np.array([[1.0, -1.0], [-1.0, 1.0]], np.float32),
             "bias": np.zeros(2, np.float32)}}}


def _two_blob_image() -> np.ndarray:
  """``[16, 16, 2]``: in the top-right quadrant a channel-0 blob (rows 0-3, cols 8-11) and
  a channel-1 blob (rows 4-7, cols 12-15); the same blobs again outside it, as decoys."""
  image = np.zeros((16, 16, 2), np.float32)
  image[0:4, 8:12, 0] = image[4:8, 12:16, 1] = 1.0  # top right
  image[8:12, 0:4, 0] = image[12:16, 4:8, 1] = 1.0  # bottom left: masked out
  return image


def test_grad_cam_is_the_hand_computation_and_heats_the_quadrant_the_logit_sees():
  image = _two_blob_image()
  apply_fn = Masked().apply
  pooled = image.reshape(8, 2, 8, 2, 2).mean(axis=(1, 3))  # the mask's input [8, 8, 2]
  masked = pooled * ((np.arange(8)[:, None] < 4) & (np.arange(8)[None, :] >= 4))[..., None]
  for class_id, (own, other) in enumerate([(0, 1), (1, 0)]):
    heat = interpret.grad_cam(apply_fn, MASKED_VARIABLES, jnp.asarray(image), "mask", class_id)
    # d logit / d A_c = +-1/64 everywhere, so the map is relu(A_own - A_other) / 64.
    np.testing.assert_allclose(heat, np.maximum(masked[..., own] - masked[..., other], 0) / 64,
                               atol=1e-7)
    full = interpret.upsample(heat, (16, 16))
    assert full[:8, 8:].sum() > 0.8 * full.sum()  # the top-right quadrant
    blob = image[:8, 8:, own] > 0  # the class's own blob in that quadrant
    assert full[:8, 8:][blob].sum() > 0.8 * full.sum()


def test_grad_cam_checks_its_class_and_layer():
  with pytest.raises(UserError, match=r"class 2; expected a class id in \[0, 2\)"):
    interpret.grad_cam(Masked().apply, MASKED_VARIABLES, jnp.zeros((16, 16, 2)), "mask", 2)
  with pytest.raises(UserError, match=r"unknown layer 'head'; expected a module path with an "
                     r"\[H, W, C\] output, one of \['conv', 'mask'\]"):
    interpret.grad_cam(Masked().apply, MASKED_VARIABLES, jnp.zeros((16, 16, 2)), "head", 0)


class TinyGAP(nn.Module):
  """ResNet's ending in miniature: conv, ReLU, sown ``stage4``, global average (times
  ``scale``: 1 is a true global-average-pool model), ``fc``."""
  scale: float = 1.0

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    del train
    x = nn.relu(nn.Conv(3, (1, 1), name="conv")(x))
    self.sow("intermediates", "stage4", x)
    return nn.Dense(2, name="fc")(self.scale * x.mean(axis=(1, 2)))


TINY_GAP_W = np.array([[1.0, -2.0], [0.5, 1.0], [-1.0, 0.5]], np.float32)
TINY_GAP_B = np.array([0.3, -0.1], np.float32)
TINY_GAP_VARIABLES = {"params": {
    "conv": {"kernel": np.eye(3, dtype=np.float32)[None, None], "bias": np.zeros(3, np.float32)},
    "fc": {"kernel": TINY_GAP_W, "bias": TINY_GAP_B}}}


def test_cam_is_the_feature_map_times_the_class_weights():
  image = np.random.default_rng(0).normal(size=(6, 5, 3)).astype(np.float32)
  logits = TinyGAP().apply(TINY_GAP_VARIABLES, image[None])[0]
  for k in range(2):
    cam = interpret.class_activation_map(TinyGAP().apply, TINY_GAP_VARIABLES, jnp.asarray(image), k)
    np.testing.assert_allclose(cam, np.maximum(image, 0) @ TINY_GAP_W[:, k], rtol=1e-5, atol=1e-6)
    assert cam.mean() + TINY_GAP_B[k] == pytest.approx(float(logits[k]), rel=1e-5)


def test_cam_refuses_models_that_do_not_pool_a_sown_map_into_the_head():
  with pytest.raises(UserError, match=r"the model sows no \[h, w, 2\] feature map for 'head'; "
                     r"CAM needs a model that global-average-pools"):
    interpret.class_activation_map(Masked().apply, MASKED_VARIABLES, jnp.zeros((16, 16, 2)), 0)
  image = jnp.ones((4, 4, 3))
  with pytest.raises(UserError, match=r"no sown feature map averages to the input of 'fc'"):
    interpret.class_activation_map(TinyGAP(scale=2.0).apply, TINY_GAP_VARIABLES, image, 0)


def test_layers_and_activations_of_every_channel():
  layers = interpret.list_layers(Masked().apply, MASKED_VARIABLES, (16, 16, 2))
  assert [(l.path, l.module_type, l.shape) for l in layers] == [
      ("conv", nn.Conv, (16, 16, 2)), ("mask", TopRightMask, (8, 8, 2)), ("head", nn.Dense, (2,))]
  assert interpret.top_level_conv_layers(layers) == ["conv"]
  image = _two_blob_image()
  acts = interpret.activations(Masked().apply, MASKED_VARIABLES, jnp.asarray(image), ["conv", "mask"])
  np.testing.assert_allclose(acts["conv"], image)  # identity conv of a non-negative image
  panels = interpret.activation_panels(acts["mask"])
  assert panels.shape == (2, 8, 8, 1)  # one panel per channel of the layer
  assert panels.min() == 0.0 and panels.max() == 1.0


class PatternNet(nn.Module):
  """A 3x3 conv with 4 channels and ReLU on RGB images, then a dense layer."""

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    del train
    x = nn.relu(nn.Conv(4, (3, 3), name="conv")(x))
    return nn.Dense(2, name="head")(x.reshape(x.shape[0], -1))


def _pattern_variables() -> dict:
  rng = np.random.default_rng(1)
  return {"params": {
      "conv": {"kernel": rng.normal(size=(3, 3, 3, 4)).astype(np.float32),
               "bias": np.full(4, -0.5, np.float32)},
      "head": {"kernel": rng.normal(size=(8 * 8 * 4, 2)).astype(np.float32),
               "bias": np.zeros(2, np.float32)}}}


def test_first_layer_filters_are_the_kernels_scaled_to_the_unit_range():
  variables = _pattern_variables()
  path, filters = interpret.first_layer_filters(PatternNet().apply, variables, (8, 8, 3))
  assert path == "conv" and filters.shape == (4, 3, 3, 3)
  kernel = variables["params"]["conv"]["kernel"][..., 2]
  np.testing.assert_allclose(filters[2], (kernel - kernel.min()) / (kernel.max() - kernel.min()),
                             rtol=1e-6)


def test_gradient_ascent_raises_each_target_channel():
  found = interpret.preferred_patterns(PatternNet().apply, _pattern_variables(), (8, 8, 3), "conv",
                                       [0, 3, 1], steps=30)
  assert found.images.shape == (3, 8, 8, 3)
  assert (found.end > found.start + 0.5).all()
  unit = interpret.to_unit_range(found.images)
  assert unit.min() == 0.0 and unit.max() == 1.0


@pytest.mark.slow
def test_pictures_of_a_run(tmp_path, npz_path, monkeypatch):
  """The glue of ``write_pictures`` on a freshly initialised SeedCNN run (restoring a
  trained run is ``assemble.restore``'s job, covered by the report's end-to-end test)."""
  config = default.get_config()
  config.data.source, config.data.val_size = str(npz_path), 32.0
  setup = assemble.build(config)
  monkeypatch.setattr(assemble, "restore", lambda workdir, which: setup)
  written = interpret.write_pictures(tmp_path, 5, num_patterns=3, steps=5)
  assert [p.name for p in written] == [
      "image5_ConvBlock_0.png", "image5_ConvBlock_1.png", "filters_ConvBlock_0.Conv_0.png",
      "patterns_ConvBlock_1.png", "image5_heatmaps.png"]
  assert all(p.parent == tmp_path / "interpret" for p in written)
  with Image.open(written[1]) as grid:  # SeedCNN's second block: 16 channels, 16 to a row
    assert grid.size[0] > 4 * grid.size[1]
  with Image.open(written[-1]) as panels:  # the image and Grad-CAM (SeedCNN has no CAM)
    assert 1.5 < panels.size[0] / panels.size[1] < 2.5
  with pytest.raises(UserError, match=r"image 64; expected a test image index in \[0, 64\)"):
    interpret.write_pictures(tmp_path, 64)
  with pytest.raises(UserError, match=r"unknown layer 'Dense_0'; expected a module path"):
    interpret.write_pictures(tmp_path, 0, layers=["Dense_0"])
