import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnnjax.errors import UserError
from cnnjax.models import MODELS, create_model
from cnnjax.models.blocks import ConvBlock, pool

SMALL_MODELS = ["seed_cnn", "bn_cnn", "lenet", "keras_convnet", "mlp", "airbench", "simple_cnn"]


def _init(model, shape):
  return model.init({"params": jax.random.PRNGKey(0), "dropout": jax.random.PRNGKey(1)},
                    jnp.zeros(shape), train=False)


def _count(tree) -> int:
  return sum(x.size for x in jax.tree.leaves(tree))


@pytest.mark.slow
@pytest.mark.parametrize("name", SMALL_MODELS)
@pytest.mark.parametrize("image_shape", [(28, 28, 1), (32, 32, 3)])
def test_logits_shape_for_two_batch_sizes(name, image_shape):
  model = create_model(name, num_classes=7)
  variables = _init(model, (1, *image_shape))
  for batch in (1, 5):
    x = jax.random.normal(jax.random.PRNGKey(batch), (batch, *image_shape))
    logits, _ = model.apply(variables, x, train=True, rngs={"dropout": jax.random.PRNGKey(2)},
                            mutable=["batch_stats"])
    chex.assert_shape(logits, (batch, 7))
    chex.assert_tree_all_finite(logits)
    chex.assert_shape(model.apply(variables, x, train=False), (batch, 7))


# Parameter counts of the PyTorch versions of these models (nn.Conv2d/nn.Linear with bias,
# BatchNorm's affine weight+bias; running statistics are buffers, not parameters):
#   seed_cnn 32x32x3: conv 3*8*9+8=224, conv 8*16*9+16=1168, fc 1024*16+16=16400, fc 16*10+10=170
#   lenet 28x28x1: 156 + 2416 + 400*120+120 + 120*84+84 + 84*10+10 = 61706 (the classic LeNet-5)
#   keras_convnet 28x28x1: 320 + 18496 + 36928 + 576*64+64 + 650 = 93322 (Keras' model summary)
#   mlp 28x28x1: 784*128+128 + 128*10+10 = 101770
#   bn_cnn 32x32x3: convs 896+9248+18496+36928+73856+147584+295168+590080, BN 2*(2*32+2*64+2*128+2*256),
#     fc 1024*512+512, BN 1024, fc 512*1024+1024, BN 2048, fc 1024*10+10 = 2237610
#   simple_cnn 32x32x3: 3*10*9+10=280, 10*10*9+10=910, fc 10*16*16*10+10=25610
#   lenet padding=0 28x28x1: 156 + 2416 + 256*120+120 + 120*84+84 + 84*10+10 = 44426
#   keras_cats_dogs 150x150x3: 896 + 18496 + 73856 + 147584 + 6272*512+512 + 513 = 3453121
#     (the Keras book's model summary)
#   tiny_imagenet_cnn 64x64x3: convs 1792 + 73856 + 295168 + 1180160 + 4719616,
#     fc 2 * (1024*1024+1024) + 1024*200+200 = 8574792
#   airbench 32x32x3 (airbench94.py's make_net): whiten 2*2*3*24+24, bias-free convs
#     24*64*9 + 64*64*9 + 64*256*9 + 3 * 256*256*9, BN biases 2*(64+256+256), fc 256*10 = 1971640
@pytest.mark.parametrize("name, image_shape, count, options", [
    ("seed_cnn", (32, 32, 3), 17962, {}),
    ("lenet", (28, 28, 1), 61706, {}),
    ("lenet", (28, 28, 1), 44426, {"padding": 0}),
    ("keras_convnet", (28, 28, 1), 93322, {}),
    ("mlp", (28, 28, 1), 101770, {}),
    ("bn_cnn", (32, 32, 3), 2237610, {}),
    ("airbench", (32, 32, 3), 1971640, {}),
    ("simple_cnn", (32, 32, 3), 26800, {}),
    ("keras_cats_dogs", (150, 150, 3), 3453121, {}),
    ("tiny_imagenet_cnn", (64, 64, 3), 8574792, {}),
])
@pytest.mark.slow
def test_parameter_counts_match_pytorch(name, image_shape, count, options):
  assert _count(_init(create_model(name, **options), (1, *image_shape))["params"]) == count


@pytest.mark.slow
def test_flatten_size_follows_input_shape():
  model = create_model("seed_cnn")
  feats = {}
  for shape, size in [((32, 32, 3), 1024), ((28, 28, 1), 7 * 7 * 16)]:
    _, state = model.apply(_init(model, (1, *shape)), jnp.zeros((2, *shape)),
                           mutable=["intermediates"])
    feats[shape] = state["intermediates"]["features"][0].shape
    assert feats[shape] == (2, size)


@pytest.mark.slow
def test_bn_cnn_keeps_batch_stats_apart_and_updates_them_only_in_train_mode():
  model = create_model("bn_cnn")
  variables = _init(model, (1, 32, 32, 3))
  assert set(variables) == {"params", "batch_stats"}
  x = jax.random.normal(jax.random.PRNGKey(0), (4, 32, 32, 3)) * 3 + 1
  _, updates = model.apply(variables, x, train=True, rngs={"dropout": jax.random.PRNGKey(1)},
                           mutable=["batch_stats"])
  changed = jax.tree.map(lambda a, b: not np.allclose(a, b), variables["batch_stats"], updates["batch_stats"])
  assert all(jax.tree.leaves(changed))
  a = model.apply(variables, x, train=False)
  b = model.apply(variables, x, train=False)
  np.testing.assert_array_equal(a, b)  # eval mode: no dropout, running statistics


@pytest.mark.slow
def test_dropout_is_active_only_in_train_mode():
  model = create_model("seed_cnn")
  variables = _init(model, (1, 32, 32, 3))
  x = jax.random.normal(jax.random.PRNGKey(0), (8, 32, 32, 3))
  train = [model.apply(variables, x, train=True, rngs={"dropout": jax.random.PRNGKey(i)}) for i in (1, 2)]
  assert not np.allclose(train[0], train[1])
  np.testing.assert_array_equal(model.apply(variables, x), model.apply(variables, x))


@pytest.mark.slow
@pytest.mark.parametrize("kind, reference", [("max", nn.max_pool), ("avg", nn.avg_pool)])
@pytest.mark.parametrize("size", [8, 7])  # 7: the last row and column dropped, as flax does
def test_pooling_equals_flax_values_and_gradients(kind, reference, size):
  x = jax.random.normal(jax.random.PRNGKey(0), (2, size, size, 3))
  expected = reference(x, (2, 2), strides=(2, 2))
  np.testing.assert_allclose(pool(x, kind, 2), expected, rtol=1e-6)
  g = jax.grad(lambda v: (pool(v, kind, 2) ** 2).sum())(x)
  g_ref = jax.grad(lambda v: (reference(v, (2, 2), strides=(2, 2)) ** 2).sum())(x)
  np.testing.assert_allclose(g, g_ref, rtol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("window, size", [(2, 8), (3, 7), (4, 9)])
def test_max_pooling_gradient_is_reduce_max_s_with_ties_shared(window, size, dtype):
  # Rounded inputs tie often inside a window (as bf16 activations do); reduce_max shares the
  # gradient among ties, and so does pool (giving it all to the first maximum cost accuracy).
  x = jnp.round(jax.random.normal(jax.random.PRNGKey(1), (2, size, size, 4)) * 1.5).astype(dtype)
  h = size // window

  def reference(v):
    return v[:, :h * window, :h * window].reshape(2, h, window, h, window, 4).max(axis=(2, 4))
  r = jax.random.normal(jax.random.PRNGKey(2), (2, h, h, 4)).astype(dtype)
  np.testing.assert_array_equal(pool(x, "max", window), reference(x))
  grad = jax.jit(jax.grad(lambda v: (pool(v, "max", window) * r).astype(jnp.float32).sum()))(x)
  expected = jax.grad(lambda v: (reference(v) * r).astype(jnp.float32).sum())(x)
  assert grad.dtype == dtype
  np.testing.assert_allclose(np.asarray(grad, np.float32), np.asarray(expected, np.float32),
                             rtol=1e-6 if dtype == jnp.float32 else 1e-2)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_max_pooling_orders_signed_zeros_infinities_and_tiny_values_and_keeps_nans(dtype):
  values = np.array([-np.inf, -3.0, -1e-4, -0.0, 0.0, 1e-4, 2.5, np.inf, np.nan], np.float32)
  x = np.random.default_rng(0).choice(values, size=(16, 8, 8, 3)).astype(dtype)
  x[0, :2, :2, 0], x[0, :2, 2:4, 0], x[0, :2, 4:6, 0] = -np.inf, -0.0, [[-1e-4, -0.0], [-3, -0.0]]
  expected = x.astype(np.float32).reshape(16, 4, 2, 4, 2, 3).max(axis=(2, 4))  # NaN wins
  y = np.asarray(pool(jnp.asarray(x), "max", 2), np.float32)
  np.testing.assert_array_equal(y, expected)
  assert np.isnan(y).any() and y[0, 0, 0, 0] == -np.inf and y[0, 0, 1:3, 0].tolist() == [0, 0]


def test_conv_block_options():
  block = ConvBlock(features=5, kernel_size=5, activation="sigmoid", pooling="avg", pool_size=4)
  x = jnp.ones((2, 16, 16, 3))
  y = block.apply(block.init(jax.random.PRNGKey(0), x), x)
  chex.assert_shape(y, (2, 4, 4, 5))
  assert float(y.min()) > 0  # sigmoid then average: positive


def test_lenet_1998_variant_uses_sigmoid_and_average_pooling():
  modern, original = create_model("lenet"), create_model("lenet", activation="sigmoid", pooling="avg")
  variables = _init(modern, (1, 28, 28, 1))
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 28, 28, 1))
  assert not np.allclose(modern.apply(variables, x), original.apply(variables, x))


def test_unknown_model_and_option_errors_list_the_valid_ones():
  with pytest.raises(UserError, match=r"unknown model 'resnet9'; expected one of \['airbench', 'bn_cnn'"):
    create_model("resnet9")
  with pytest.raises(UserError, match=r"model 'lenet' has no option\(s\) \['width'\]"):
    create_model("lenet", width=3)
  with pytest.raises(UserError, match="unknown activation 'swish'"):
    _init(create_model("lenet", activation="swish"), (1, 28, 28, 1))
  assert set(SMALL_MODELS) <= set(MODELS)
