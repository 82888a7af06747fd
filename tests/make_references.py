"""Writes ``tests/references/<case>.npz``, the torch outputs the torch-free parity tests
compare against (``tests/test_parity_references.py``); also the torch helpers of the live
parity tests. Needs torch, torchvision and efficientnet-lite-pytorch; run once after changing
a case:

  pip install torch==2.14.1 torchvision==0.29.1 efficientnet-lite-pytorch
  python -m tests.make_references [CASE ...]
"""
import json
import sys

import numpy as np
import torch
import torchvision

from tests import parity


def randomise_batchnorm(model: torch.nn.Module, size: int, affine: bool = True) -> None:
  """BN running stats that keep activations O(1) but differ from any one batch's: the stats
  of one train-mode pass over random images, each then perturbed; eval mode after.
  ``affine``: also random scales and offsets (else the model's own are kept)."""
  gen = torch.Generator().manual_seed(1)
  norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
  for bn in norms:
    bn.reset_running_stats()
    bn.momentum = None  # cumulative average: one pass sets the stats to its batch stats
    if affine:
      bn.weight.data = torch.rand(bn.num_features, generator=gen) + 0.5
      bn.bias.data = torch.randn(bn.num_features, generator=gen) * 0.2
  model.train()
  with torch.no_grad():
    model(torch.randn(8, 3, size, size, generator=gen))
  for bn in norms:
    noise = torch.randn(bn.num_features, generator=gen)
    bn.running_mean += 0.2 * noise * bn.running_var.sqrt()
    bn.running_var *= torch.rand(bn.num_features, generator=gen) + 0.6
  model.eval()


def torch_outputs(model: torch.nn.Module, x: np.ndarray,
                  taps: dict[str, tuple[torch.nn.Module, str]]) -> tuple[np.ndarray, dict]:
  """Logits and the tapped activations (NHWC numpy) of ``model`` on NCHW ``x``; a tap is a
  module and whether its 'input' or 'output' is recorded."""
  seen = {}

  def hook(name, where):
    def record(module, inputs, output=None):
      value = inputs[0] if where == "input" else output
      seen[name] = value.detach().numpy()
    return record

  handles = [module.register_forward_pre_hook(hook(name, where)) if where == "input" else
             module.register_forward_hook(hook(name, where))
             for name, (module, where) in taps.items()]
  with torch.no_grad():
    logits = model(torch.from_numpy(x)).numpy()
  for handle in handles:
    handle.remove()
  return logits, {k: v.transpose(0, 2, 3, 1) if v.ndim == 4 else v for k, v in seen.items()}


def resnet_taps(model):
  taps = {"stem": (model.layer1, "input"), "features": (model.fc, "input")}
  for i in range(1, 5):
    taps[f"stage{i}"] = (getattr(model, f"layer{i}"), "output")
  return taps


def vgg_taps(model):
  """Each block ends with a max pool; ``features`` is the flattened classifier input."""
  pools = [m for m in model.features if isinstance(m, torch.nn.MaxPool2d)]
  taps = {f"block{i}": (pool, "output") for i, pool in enumerate(pools, start=1)}
  return {**taps, "features": (model.classifier[0], "input")}


def lite_taps(model):
  """Stage ends of EfficientNet-Lite0's 16 blocks (1, 2, 2, 3, 3, 4, 1 repeats)."""
  taps = {"stem": (model._blocks[0], "input"), "head": (model._avg_pooling, "input"),
          "features": (model._dropout, "input")}
  for stage, last_block in enumerate([0, 2, 4, 7, 10, 14, 15], start=1):
    taps[f"stage{stage}"] = (model._blocks[last_block], "output")
  return taps


def _cifar_resnet18() -> torch.nn.Module:
  model = torchvision.models.resnet18(num_classes=10)
  model.conv1 = torch.nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False)
  model.maxpool = torch.nn.Identity()
  return model


def _lite0() -> torch.nn.Module:
  from efficientnet_lite_pytorch import EfficientNet  # pylint: disable=import-outside-toplevel
  return EfficientNet.from_name("efficientnet-lite0")


TORCH_MODELS = {  # case -> (constructor, taps, the key its classifier gain applies to)
    "resnet18": (torchvision.models.resnet18, resnet_taps, None),
    "resnet18_cifar": (_cifar_resnet18, resnet_taps, None),
    "resnet50": (torchvision.models.resnet50, resnet_taps, None),
    "vgg16_bn": (torchvision.models.vgg16_bn, vgg_taps, "classifier.6"),
    "efficientnet_lite0": (_lite0, lite_taps, None),
}


def write(name: str) -> None:
  make, taps, gain_key = TORCH_MODELS[name]
  case = parity.CASES[name]
  model = make()
  shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
  values = parity.numpy_weights(shapes, gain_key, case.classifier_gain)
  model.load_state_dict({k: torch.from_numpy(v) for k, v in values.items()}, strict=False)
  randomise_batchnorm(model, case.size, affine=False)
  logits, seen = torch_outputs(model, parity.case_input(name), taps(model))
  stats = {f"stat:{k}": v.numpy() for k, v in model.state_dict().items()
           if k.rsplit(".", 1)[-1] in parity.STATS}
  meta = {"shapes": shapes, "gain_key": gain_key, "torch": torch.__version__,
          "torchvision": torchvision.__version__}
  parity.REFERENCES.mkdir(exist_ok=True)
  np.savez_compressed(parity.REFERENCES / f"{name}.npz", meta=json.dumps(meta), logits=logits,
                      features=seen["features"], **stats)
  print(f"{name}: logits {logits.shape}, max |logit| {np.abs(logits).max():.3g}")


if __name__ == "__main__":
  for case_name in sys.argv[1:] or parity.CASES:
    write(case_name)
