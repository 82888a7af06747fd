"""The parity cases shared by the torch-free reference tests and the script that writes their
references (``tests/make_references.py``, the only place that runs torch for them).

A case is a torchvision (or EfficientNet-Lite package) model with seeded weights on a seeded
NCHW input. Conv and linear weights and batch norm's scale and offset are drawn with numpy
from the key's name (``numpy_weights``), so the tests rebuild them without torch; the
running statistics of batch norm (a train-mode pass, then perturbed) are stored in the
reference file with the torch model's logits and pre-classifier features.
"""
import json
import pathlib
import zlib
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

REFERENCES = pathlib.Path(__file__).parent / "references"
STATS = ("running_mean", "running_var", "num_batches_tracked")


class Case(NamedTuple):
  """``model_name`` picks the key map; ``size`` the input side; ``seed`` its input."""
  model_name: str
  size: int
  seed: int
  classifier_gain: float = 1.0  # scales the last layer so the logits are not tiny


CASES = {
    "resnet18": Case("resnet18", 64, 0),
    "resnet18_cifar": Case("resnet18", 32, 1),
    "resnet50": Case("resnet50", 64, 0),
    "vgg16_bn": Case("vgg16_bn", 64, 0, classifier_gain=3.0),
    "efficientnet_lite0": Case("efficientnet_lite0", 96, 2),
}


def flax_model(name: str):
  """The flax model of case ``name`` (random weights until converted ones are loaded)."""
  from cnnjax.models.efficientnet import EfficientNetLite
  from cnnjax.models.resnet import ResNet18, ResNet50
  from cnnjax.models.vgg import VGG16BN
  return {"resnet18": ResNet18, "resnet18_cifar": lambda: ResNet18(num_classes=10, cifar_stem=True),
          "resnet50": ResNet50, "vgg16_bn": VGG16BN, "efficientnet_lite0": EfficientNetLite}[name]()


def case_input(name: str) -> np.ndarray:
  """The case's input ``[2, 3, S, S]`` (NCHW, float32)."""
  case = CASES[name]
  return np.random.default_rng(case.seed).standard_normal((2, 3, case.size, case.size)).astype(np.float32)


def numpy_weights(shapes: dict[str, tuple[int, ...]], gain_key: str | None, gain: float
                  ) -> dict[str, np.ndarray]:
  """Every entry but batch norm's statistics, seeded by its key: He-normal kernels, small
  biases, scales in [0.5, 1.5), offsets ~ N(0, 0.2)."""
  out = {}
  for key, shape in shapes.items():
    if key.rsplit(".", 1)[-1] in STATS:
      continue
    rng = np.random.default_rng(zlib.crc32(key.encode()))
    if len(shape) > 1:
      fan_in = int(np.prod(shape[1:]))
      value = rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)
    elif key.endswith("weight"):  # batch norm's scale
      value = rng.uniform(0.5, 1.5, shape)
    else:
      value = rng.standard_normal(shape) * 0.2
    if gain_key is not None and key.startswith(gain_key):
      value = value * gain
    out[key] = value.astype(np.float32)
  return out


def reference(name: str) -> dict[str, Any]:
  """The stored reference of case ``name``: ``state_dict`` (numpy weights and the stored
  statistics), ``logits`` ``[2, K]`` and ``features`` (the classifier's input)."""
  with np.load(REFERENCES / f"{name}.npz") as f:
    meta = json.loads(str(f["meta"]))
    stats = {k[len("stat:"):]: f[k] for k in f.files if k.startswith("stat:")}
    logits, features = f["logits"], f["features"]
  shapes = {k: tuple(v) for k, v in meta["shapes"].items()}
  state_dict = {**numpy_weights(shapes, meta["gain_key"], CASES[name].classifier_gain), **stats}
  assert set(state_dict) == set(shapes), "reference file and key list disagree"
  return {"state_dict": state_dict, "logits": logits, "features": features}


def flax_outputs(model, variables, x_nchw: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
  """Logits and the sown intermediates (NHWC) of ``model`` in inference mode."""
  apply = jax.jit(lambda v, x: model.apply(v, x, train=False, mutable=["intermediates"]))
  logits, state = apply(variables, jnp.asarray(x_nchw.transpose(0, 2, 3, 1)))
  return np.asarray(logits), {k: np.asarray(v[0]) for k, v in state["intermediates"].items()}
