"""The transfer configs: every backbone's rules fit its parameters, and the course's VGG16
feature extraction runs end to end (random weights, tiny images)."""
import os

import jax
import jax.numpy as jnp
import pytest
from flax import traverse_util
from PIL import Image

from cnnjax import models, optim, train
from cnnjax.errors import UserError
from experiments import entry
from experiments.configs import transfer_base

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(name, arg=None):
  path = os.path.join(ROOT, f"experiments/configs/{name}.py")
  return entry.load_config_file(path if arg is None else f"{path}:{arg}")


@pytest.mark.parametrize("backbone", sorted(transfer_base.BACKBONES))
@pytest.mark.parametrize("workflow", ["frozen", "finetune"])
def test_rules_give_every_parameter_one_group(backbone, workflow):
  config = _config("cifar_transfer", f"{backbone},{workflow}")
  model = models.model_from_config(config.model)
  dummy = jnp.zeros((1, 64, 64, 3))
  params = jax.eval_shape(lambda: model.init(jax.random.key(0), dummy))["params"]
  labels = traverse_util.flatten_dict(optim.group_labels(params, config.optimizer.groups),
                                      sep="/")
  frozen = [path for path, label in labels.items() if label == optim.FROZEN]
  assert frozen and all(path.startswith("backbone/") for path in frozen)
  assert all(label == "lr*1" for path, label in labels.items() if path.startswith("head/"))
  if workflow == "finetune":  # the last stage's convolutions at a tenth, its batch norms frozen
    slow = [path for path, label in labels.items() if label == "lr*0.1"]
    assert slow and len(frozen) > len(slow)
    assert not any("bn" in path or "downsample_1" in path for path in slow)


def test_config_argument_is_checked():
  with pytest.raises(UserError, match=r"config argument 'vgg19,frozen'; expected "
                     r"'<backbone>,<workflow>'"):
    _config("hymenoptera", "vgg19,frozen")
  assert _config("resnet50_cifar").model.dropout_rate == 0.2


@pytest.mark.slow
def test_vgg16_feature_extraction_runs_end_to_end(tmp_path):
  for split in ("train", "val"):
    for label, level in (("ants", 40), ("bees", 200)):
      (tmp_path / "data" / split / label).mkdir(parents=True)
      for i in range(4):
        Image.new("RGB", (40, 36), (level + 5 * i,) * 3).save(
            tmp_path / "data" / split / label / f"{i}.png")
  config = _config("vgg16_features")
  config.data.source = str(tmp_path / "data")
  config.model.pretrained = None  # random weights, offline
  config.data.image_size, config.num_epochs, config.batch_size = 32, 2, 4
  result = train.train_and_evaluate(config, tmp_path / "run")
  assert result["count"] == 8 and len(result["confusion_matrix"]) == 2
  assert (tmp_path / "run" / "features.npz").is_file()
  assert (tmp_path / "run" / "predictions.png").stat().st_size > 0
