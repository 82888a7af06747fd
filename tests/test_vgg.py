"""VGG-16 (torchvision layout, Keras names), adaptive pooling, and TransferNet's layout."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnnjax.errors import UserError
from cnnjax.models import TransferNet, create_model
from cnnjax.models.blocks import adaptive_avg_pool
from cnnjax.models.vgg import VGG, VGG16BN, torch_module_names

KEY = jax.random.key(0)


def _params(model, shape=(1, 32, 32, 3)):
  return jax.eval_shape(lambda: model.init(KEY, jnp.zeros(shape)))["params"]


@pytest.mark.parametrize("model, expected", [
    (VGG(), 138_357_544),  # torchvision vgg16
    (VGG16BN(), 138_365_992),  # torchvision vgg16_bn
    (VGG(num_classes=0), 14_714_688),  # Keras VGG16(include_top=False)
])
def test_parameter_counts_equal_the_references(model, expected):
  assert sum(leaf.size for leaf in jax.tree.leaves(_params(model))) == expected


def test_include_top_false_returns_the_4x4x512_map_at_150():
  model = VGG(num_classes=0)
  variables = jax.eval_shape(lambda: model.init(KEY, jnp.zeros((1, 150, 150, 3))))
  out, state = jax.eval_shape(lambda v: model.apply(v, jnp.zeros((2, 150, 150, 3)),
                                                    mutable=["intermediates"]), variables)
  chex.assert_shape(out, (2, 4, 4, 512))
  assert {k: v[0].shape[1] for k, v in state["intermediates"].items()} == {
      "block1": 75, "block2": 37, "block3": 18, "block4": 9, "block5": 4}


def test_classifier_sees_7x7x512_at_any_size():
  for size in (32, 64, 224):
    logits, state = jax.eval_shape(
        lambda: VGG(num_classes=3).init_with_output(KEY, jnp.zeros((1, size, size, 3))))
    chex.assert_shape(logits, (1, 3))
    assert state["params"]["fc1"]["kernel"].shape == (7 * 7 * 512, 4096)


def test_torch_module_names_are_keras_names():
  names = torch_module_names()
  assert names["features.0"] == "block1_conv1" and names["features.28"] == "block5_conv3"
  assert names["classifier.6"] == "predictions" and len(names) == 13 + 3
  bn = torch_module_names(batch_norm=True)
  assert bn["features.1"] == "block1_bn1" and bn["features.41"] == "block5_bn3"


def _torch_adaptive_avg_pool(x, size):
  """torch's definition, one output cell at a time."""
  _, h, w, _ = x.shape
  out = np.zeros((x.shape[0], size, size, x.shape[3]), np.float32)
  for i in range(size):
    for j in range(size):
      rows = slice(i * h // size, -(-(i + 1) * h // size))
      cols = slice(j * w // size, -(-(j + 1) * w // size))
      out[:, i, j] = x[:, rows, cols].mean(axis=(1, 2))
  return out


@pytest.mark.parametrize("height, width", [(1, 1), (2, 3), (7, 7), (9, 12)])
def test_adaptive_avg_pool_bins_are_torchs(height, width):
  x = np.random.default_rng(0).standard_normal((2, height, width, 3)).astype(np.float32)
  np.testing.assert_allclose(adaptive_avg_pool(jnp.asarray(x), 7), _torch_adaptive_avg_pool(x, 7),
                             rtol=1e-6, atol=1e-6)


def test_transfer_net_puts_backbone_and_head_under_their_names():
  model = create_model("transfer", backbone="vgg16", num_classes=1, hidden=[256],
                       dropout_rate=0.5)
  params = _params(model, (1, 150, 150, 3))
  assert set(params) == {"backbone", "head"}
  assert params["head"]["hidden_0"]["kernel"].shape == (4 * 4 * 512, 256)
  assert params["head"]["output"]["kernel"].shape == (256, 1)
  assert "block5_conv3" in params["backbone"] and "fc1" not in params["backbone"]
  with pytest.raises(UserError, match=r"unknown backbone 'lenet'; expected one of \['resnet18'"):
    _params(TransferNet("lenet", 2))
