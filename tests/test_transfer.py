"""Transfer learning: frozen parameters and statistics, pretrained and another run's weights,
feature extraction, binary classification, image folders as a source."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util
from PIL import Image

from cnnjax import assemble, initial, optim, steps, train
from cnnjax import config as config_lib
from cnnjax.checkpoint import Checkpoints
from cnnjax.data import augment, pipeline, sources
from cnnjax.errors import UserError
from cnnjax.models import ResNet18, TransferNet
from experiments.configs import default
from tests.conftest import make_images
from tests.test_weights import _random_variables, _state_dict

IDENTITY = steps.make_normalize(np.zeros(3), np.full(3, 255.0))
GROUPS = ("backbone/.*:frozen", "head/.*:1.0")


class _Backbone(nn.Module):
  @nn.compact
  def __call__(self, x, train=False):
    x = nn.Conv(4, (3, 3), name="conv")(x)
    x = nn.relu(nn.BatchNorm(use_running_average=not train, name="bn")(x))
    x = nn.Dropout(0.5, deterministic=not train)(x)
    return x.mean(axis=(1, 2))


class _Head(nn.Module):
  @nn.compact
  def __call__(self, x, train=False):
    x = nn.BatchNorm(use_running_average=not train, name="bn")(nn.Dense(8, name="dense")(x))
    x = nn.Dropout(0.5, deterministic=not train)(x)
    return nn.Dense(3, name="output")(x)


class _Net(nn.Module):
  """A backbone and a head, each with batch norm and dropout."""

  @nn.compact
  def __call__(self, x, train=False):
    return _Head(name="head")(_Backbone(name="backbone")(x, train), train)


def _flat(tree):
  return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(jax.device_get(tree)).items()}


def _batch(seed):
  x, y = make_images(16, shape=(8, 8, 3), num_classes=3, seed=seed)
  return {"image": jnp.asarray(x), "label": jnp.asarray(y)}


@pytest.mark.slow
def test_frozen_backbone_params_and_batch_stats_stay_bit_identical_without_optimizer_state():
  cfg = config_lib.default_optimizer_config()
  cfg.groups = GROUPS
  tx = optim.make_optimizer(cfg, optax.constant_schedule(0.05))
  state = steps.create_train_state(_Net(), tx, (8, 8, 3), 0)
  frozen = optim.frozen_modules(state.params, cfg.groups)
  assert frozen == {("backbone",), ("backbone", "conv"), ("backbone", "bn")}
  before = _flat({"params": state.params, "batch_stats": state.batch_stats})
  step = jax.jit(steps.make_train_step(IDENTITY, frozen=frozen))
  for seed in range(3):
    state, _ = step(state, _batch(seed))
  after = _flat({"params": state.params, "batch_stats": state.batch_stats})
  for key, value in before.items():
    if key[1] == "backbone":
      assert after[key].tobytes() == value.tobytes(), key
    else:  # the head's weights and its batch statistics do move
      assert not np.array_equal(after[key], value), key
  paths = [jax.tree_util.keystr(path) for path, _ in
           jax.tree_util.tree_flatten_with_path(state.opt_state)[0]]
  assert paths and not any("backbone" in p for p in paths)
  assert sum(leaf.size for leaf in jax.tree.leaves(state.opt_state)) == 2 * sum(
      leaf.size for leaf in jax.tree.leaves(state.params["head"])) + 2  # Adam mu, nu + counts


@pytest.mark.slow
def test_frozen_modules_run_in_inference_mode_while_training():
  model = _Net()
  x = _batch(0)["image"].astype(jnp.float32) / 255
  variables = model.init(jax.random.key(0), x)
  frozen = optim.frozen_modules(variables["params"], (".*:frozen",))

  def train_mode(frozen):
    with optim.frozen_inference(frozen):
      return model.apply(variables, x, train=True, mutable=["batch_stats"],
                         rngs={"dropout": jax.random.key(1)})

  inference = jax.jit(lambda: model.apply(variables, x, train=False))()
  assert not np.allclose(jax.jit(train_mode, static_argnums=0)(frozenset())[0], inference)
  logits, updates = jax.jit(train_mode, static_argnums=0)(frozen)
  np.testing.assert_array_equal(logits, inference)
  assert _flat(updates["batch_stats"]).keys() == _flat(variables["batch_stats"]).keys()
  for key, value in _flat(variables["batch_stats"]).items():
    np.testing.assert_array_equal(_flat(updates["batch_stats"])[key], value)


def test_lr_multiplier_scales_a_groups_updates():
  cfg = config_lib.default_optimizer_config()
  cfg.name, cfg.groups = "sgd", ("a/.*:0.1", "b/.*:1")
  params = {"a": {"w": jnp.ones(2)}, "b": {"w": jnp.ones(2)}}
  tx = optim.make_optimizer(cfg, optax.constant_schedule(1.0))
  updates, _ = tx.update(jax.tree.map(jnp.ones_like, params), tx.init(params), params)
  np.testing.assert_allclose(updates["a"]["w"], -0.1)
  np.testing.assert_allclose(updates["b"]["w"], -1.0)


def test_with_variables_replaces_matching_leaves_and_lists_mismatches():
  tx = optax.adam(1e-3)
  state = steps.create_train_state(_Net(), tx, (8, 8, 3), 0)
  kernel = np.full(state.params["backbone"]["conv"]["kernel"].shape, 0.5, np.float32)
  new = initial.with_variables(state, {"params": {"backbone": {"conv": {"kernel": kernel}}}}, "x")
  np.testing.assert_array_equal(new.params["backbone"]["conv"]["kernel"], kernel)
  np.testing.assert_array_equal(new.params["head"]["output"]["kernel"],
                                state.params["head"]["output"]["kernel"])
  bad = {"params": {"backbone": {"conv": {"kernel": kernel[..., :2]}, "extra": {"w": kernel}}}}
  with pytest.raises(UserError, match=r"^weights w does not fit the model: params/backbone/conv/"
                     r"kernel \(3, 3, 3, 2\) \(model \(3, 3, 3, 4\)\), params/backbone/extra/w"):
    initial.with_variables(state, bad, "weights w")
  with pytest.raises(UserError, match="params/head/output/bias missing"):
    initial.with_variables(state, {"params": {"backbone": state.params["backbone"]}}, "run",
                            complete=True)


def _config(source, **kw):
  c = default.get_config()
  c.data.source = str(source)
  c.data.val_size = 16.0
  c.batch_size = 16
  c.eval_batch_size = 16
  c.num_epochs = 1
  for key, value in kw.items():
    *sections, name = key.split("__")
    node = c
    for section in sections:
      node = node[section]
    node[name] = value
  return c


def _transfer_config(source, backbone, **kw):
  c = _config(source, **kw)
  c.model.name = "transfer"
  c.model.backbone = backbone
  c.model.hidden = (8,)
  c.model.dropout_rate = 0.5
  return c


def test_pretrained_weights_go_to_the_backbone_of_a_transfer_net(tmp_path):
  variables = _random_variables(ResNet18(num_classes=0))
  path = tmp_path / "resnet18.npz"
  np.savez(path, **_state_dict(variables))
  model = TransferNet("resnet18", num_classes=2, hidden=(8,))
  loaded = initial.pretrained_variables(model, "transfer", str(path), (32, 32, 3), seed=0)
  assert _flat(loaded).keys() == {("params" if k[0] == "params" else "batch_stats", "backbone",
                                   *k[1:]) for k in _flat(variables)}
  for key, value in _flat(variables).items():
    np.testing.assert_array_equal(_flat(loaded)[(key[0], "backbone", *key[1:])], value)


@pytest.mark.slow
def test_head_classes_take_their_rows_of_the_pretrained_classifier(tmp_path, npz_path):
  variables = _random_variables(ResNet18())  # with ImageNet's 1000-way fc
  path = tmp_path / "resnet18.npz"
  np.savez(path, **_state_dict(variables))
  fc = variables["params"]["fc"]
  classes = (310, 309, 0, 1, 2, 3, 4, 5, 6, 999)  # one per class of the data, in its order
  config = _transfer_config(npz_path, "resnet18", model__pretrained=str(path),
                            model__head_classes=classes)
  config.model.hidden = ()
  head = assemble.build(config).state.params["head"]["output"]
  np.testing.assert_array_equal(head["kernel"], fc["kernel"][:, classes])
  np.testing.assert_array_equal(head["bias"], fc["bias"][list(classes)])
  config.model.hidden = (8,)
  with pytest.raises(UserError, match=r"initialises a head of 10 outputs without hidden "
                     r"layers; the model has num_classes=10, hidden=\(8,\)"):
    assemble.build(config)
  config.model.hidden, config.model.head_classes = (), classes[:-1] + (1000,)
  with pytest.raises(UserError, match=r"has classes 0..999"):
    assemble.build(config)


class _TinyBackbone(_Backbone):
  """A registered backbone takes num_classes=0."""
  num_classes: int = 0


@pytest.fixture
def tiny_backbone(monkeypatch):
  """Registers ``_TinyBackbone`` as backbone 'tiny' for TransferNet."""
  from cnnjax import models
  monkeypatch.setitem(models.MODELS, "tiny", _TinyBackbone)
  monkeypatch.setattr(models, "BACKBONES", (*models.BACKBONES, "tiny"))


@pytest.mark.slow
def test_feature_extraction_equals_running_the_frozen_backbone_and_is_cached(
    npz_path, tmp_path, capsys, tiny_backbone):
  config = _transfer_config(npz_path, backbone="tiny", extract_features=True,
                            model__num_classes=10, data__limit=48)
  s = assemble.build(config, tmp_path)
  backbone = _TinyBackbone()
  variables = backbone.init(jax.random.PRNGKey(config.seed), jnp.zeros((1, 32, 32, 3)))
  images, labels = pipeline.split_validation(*s.images.train, 16.0, config.seed)[0]
  normalize = steps.make_normalize(*pipeline.channel_stats(images))
  expected = backbone.apply(variables, normalize(jnp.asarray(images)), train=False)
  assert s.train[0].shape == (32, 1, 1, 4) and s.data.test[0].shape == (48, 1, 1, 4)
  np.testing.assert_allclose(s.train[0][:, 0, 0], expected, rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(s.train[1], labels)
  assert set(s.state.params) == {"hidden_0", "output"}  # the head alone is trained
  again = assemble.build(config, tmp_path)
  assert "Features from" in capsys.readouterr().out
  np.testing.assert_array_equal(again.train[0], s.train[0])


def test_feature_extraction_refuses_augmentation(npz_path):
  config = _transfer_config(npz_path, "resnet18", extract_features=True,
                            data__augment__horizontal_flip=True)
  with pytest.raises(UserError, match="extract_features runs the backbone once"):
    assemble.build(config)


@pytest.mark.slow
def test_init_from_another_run_takes_its_latest_weights(npz_path, tmp_path):
  config = _config(npz_path, model__name="seed_cnn")
  first = assemble.build(config).state
  first = first.replace(params=jax.tree.map(lambda p: p + 1.0, first.params), step=7)
  checkpoints = Checkpoints(tmp_path / "first" / "checkpoints")
  checkpoints.save(7, first)
  checkpoints.wait()
  checkpoints.close()
  config.init_from = str(tmp_path / "first")
  config.optimizer.groups = ("ConvBlock_0/.*:frozen", "(?!ConvBlock_0/).*:0.1")
  s = assemble.build(config)
  saved, started = _flat(first.params), _flat(s.state.params)
  assert saved.keys() == started.keys()
  for key in saved:
    np.testing.assert_array_equal(started[key], saved[key])
  assert int(s.state.step) == 0
  config.model.name, config.optimizer.groups = "mlp", ()
  with pytest.raises(UserError, match=r"config.init_from=.*first.* does not fit the model"):
    assemble.build(config)
  config.init_from = str(tmp_path / "nothing")
  with pytest.raises(UserError, match="has no checkpoints/; expected the --workdir"):
    assemble.build(config)


def test_binary_cross_entropy_loss_and_prediction():
  logits = jnp.array([[2.0], [-1.0], [0.5]])
  labels = jnp.array([1, 1, 0])
  loss, pred = steps.loss_and_prediction(logits, labels, "binary_cross_entropy")
  p = jax.nn.sigmoid(logits[:, 0])
  np.testing.assert_allclose(loss, -jnp.where(labels == 1, jnp.log(p), jnp.log(1 - p)), rtol=1e-6)
  np.testing.assert_array_equal(pred, [1, 0, 1])


@pytest.mark.slow
def test_binary_run_reports_a_two_by_two_confusion_matrix(tmp_path):
  x, y = make_images(96, num_classes=2, seed=1)
  xt, yt = make_images(32, num_classes=2, seed=2)
  path = tmp_path / "binary.npz"
  np.savez(path, x_train=x, y_train=y, x_test=xt, y_test=yt)
  config = _config(path, model__num_classes=1, loss="binary_cross_entropy", num_epochs=3)
  result = train.train_and_evaluate(config, tmp_path / "run")
  assert np.array(result["confusion_matrix"]).shape == (2, 2)
  assert np.array(result["confusion_matrix"]).sum() == 32 and result["accuracy"] > 0.6
  config.model.num_classes = 2
  with pytest.raises(UserError, match="expected num_classes=1 .one sigmoid output. and labels 0/1"):
    assemble.build(config)


def _image_folder(root, splits=("train", "val"), per_class=6, size=(20, 14)):
  """Class folders 'a' (dark) and 'b' (bright) of solid PNGs, under each of ``splits``."""
  for split in splits:
    for label, level in (("a", 40), ("b", 200)):
      folder = root / split / label
      folder.mkdir(parents=True)
      for i in range(per_class):
        Image.new("RGB", size, (level + i,) * 3).save(folder / f"{i}.png")
  return root


@pytest.mark.slow
def test_image_folder_source_with_train_and_val(tmp_path):
  data = sources.load(str(_image_folder(tmp_path / "hym")), image_size=8)
  assert data.class_names == ["a", "b"] and data.train[0].shape == (12, 8, 8, 3)
  assert data.val[0].shape == (12, 8, 8, 3)
  np.testing.assert_array_equal(data.test[0], data.val[0])  # no test/: val/ is both
  s = assemble.build(_config(tmp_path / "hym", data__image_size=8, model__num_classes=2,
                          batch_size=4, eval_batch_size=4))
  assert len(s.train[1]) == 12 and len(s.val[1]) == 12  # data.val_size is not used


@pytest.mark.slow
def test_image_folder_source_with_val_and_test_and_class_folders_only(tmp_path):
  data = sources.load(str(_image_folder(tmp_path / "three", ("train", "val", "test"), 3)),
                      image_size=8)
  assert [len(split[1]) for split in (data.train, data.val, data.test)] == [6, 6, 6]
  root = _image_folder(tmp_path / "flat", ("",), per_class=10)
  config = _config(root, data__image_size=8, data__val_size=0.25, model__num_classes=2,
                   batch_size=5, eval_batch_size=5)
  s = assemble.build(config)
  assert len(s.train[1]) == 15 and len(s.val[1]) == 5
  np.testing.assert_array_equal(s.data.test[0], s.val[0])  # tested on the validation split
  with pytest.raises(UserError, match=r"image folder .*flat needs data.image_size > 0"):
    sources.load(str(root))


def test_image_folder_splits_must_have_the_same_classes(tmp_path):
  root = _image_folder(tmp_path / "r")
  (root / "val" / "c").mkdir()
  Image.new("RGB", (4, 4)).save(root / "val" / "c" / "x.png")
  with pytest.raises(UserError, match=r"has classes \['a', 'b', 'c'\]; expected those of"):
    sources.load(str(root), image_size=8)


def test_normalization_stats():
  images = np.random.default_rng(0).integers(0, 256, (4, 5, 5, 3), dtype=np.uint8)
  mean, std = pipeline.normalization_stats("imagenet", images)
  np.testing.assert_allclose(mean / 255, [0.485, 0.456, 0.406], rtol=1e-6)
  np.testing.assert_allclose(std / 255, [0.229, 0.224, 0.225], rtol=1e-6)
  np.testing.assert_array_equal(pipeline.normalization_stats("lite", images),
                                ([127] * 3, [128] * 3))
  np.testing.assert_array_equal(pipeline.normalization_stats("dataset", images)[0],
                                pipeline.channel_stats(images)[0])
  with pytest.raises(UserError, match="unknown data.normalization 'caffe'; expected one of"):
    pipeline.normalization_stats("caffe", images)


def test_resizing_in_the_step_matches_augment_resize():
  images = np.random.default_rng(0).integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
  for size in (20, 5):  # up (CIFAR to a backbone's size) and down (antialiased)
    stepped = steps.make_normalize(np.zeros(3), np.ones(3), size)(jnp.asarray(images))
    np.testing.assert_allclose(stepped, augment.resize(images, size), atol=0.51)
