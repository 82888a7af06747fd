"""PyTorch peers of the cnnjax models, and their train and inference steps, for
``python -m benchmarks --mode=models`` (and the convolution step of ``--mode=convs``).

SeedCNN, LeNet and BNCNN mirror the flax modules layer for layer (same convolutions,
padding, widths, dropout, batch norm momentum 0.1 and epsilon 1e-5), so the parameter
counts match; only the flatten order differs (NCHW vs NHWC), which costs nothing. ResNet-18
is ``torchvision.models.resnet18`` (the CIFAR stem as in tests/test_parity_torch.py),
EfficientNet-Lite0 the ``efficientnet_lite_pytorch`` package's model; as backbones both
lose their classifier (and Lite0 its dropout) and return pooled features ``[B, D]``, as
``TransferNet``'s backbone does.

The benchmark runs this module in a process of its own per row (``benchmarks.harness.Peer``:
``python -m benchmarks.torch_peers FD``, see ``serve``; answers go to file descriptor FD),
apart from JAX, and times its variants in turn with cnnjax's; ``cnnjax`` never imports
torch.
"""
import contextlib
import copy
import json
import os
import sys
from typing import IO, Any, Callable

import torch
import torchvision
from torch import nn

# name -> (memory format, autocast dtype or None)
VARIANTS = {
    "f32 NCHW": (torch.contiguous_format, None),
    "f32 channels_last": (torch.channels_last, None),
    "bf16 channels_last": (torch.channels_last, torch.bfloat16),
}
KINDS = ("train", "frozen", "features")


def _flat_size(body: nn.Module, image_shape: tuple[int, int, int]) -> int:
  """Features per example after ``body`` on images ``[H, W, C]``."""
  height, width, channels = image_shape
  with torch.no_grad():
    return body(torch.zeros(1, channels, height, width)).flatten(1).shape[1]


class SeedCNN(nn.Module):
  """cnnjax ``SeedCNN``: [conv3x3 same, ReLU, maxpool2] x (8, 16), flatten, dropout 0.5,
  dense 16, ReLU, dense classes. Images ``[B, C, H, W]`` -> logits ``[B, num_classes]``."""

  def __init__(self, image_shape: tuple[int, int, int], num_classes: int = 10):
    super().__init__()
    layers, channels = [], image_shape[2]
    for width in (8, 16):
      layers += [nn.Conv2d(channels, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
      channels = width
    self.features = nn.Sequential(*layers)
    self.classifier = nn.Sequential(
        nn.Flatten(), nn.Dropout(0.5), nn.Linear(_flat_size(self.features, image_shape), 16),
        nn.ReLU(), nn.Linear(16, num_classes))

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.classifier(self.features(x))


class LeNet(nn.Module):
  """cnnjax ``LeNet`` (ReLU, max pooling): conv5x5 6 pad 2, pool, conv5x5 16 valid, pool,
  dense 120, 84, classes. Images ``[B, C, H, W]`` -> logits ``[B, num_classes]``."""

  def __init__(self, image_shape: tuple[int, int, int], num_classes: int = 10):
    super().__init__()
    self.features = nn.Sequential(
        nn.Conv2d(image_shape[2], 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2))
    self.classifier = nn.Sequential(
        nn.Flatten(), nn.Linear(_flat_size(self.features, image_shape), 120), nn.ReLU(),
        nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, num_classes))

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.classifier(self.features(x))


class BNCNN(nn.Module):
  """cnnjax ``BNCNN``: four blocks [conv3x3, ReLU, BN] x 2, maxpool2, dropout 0.25 of widths
  32/64/128/256, then [dense, ReLU, BN, dropout 0.5] x (512, 1024) and dense classes.
  Images ``[B, C, H, W]`` -> logits ``[B, num_classes]``."""

  def __init__(self, image_shape: tuple[int, int, int], num_classes: int = 10,
               conv_dropout: float = 0.25, dense_dropout: float = 0.5):
    super().__init__()
    layers, channels = [], image_shape[2]
    for width in (32, 64, 128, 256):
      for _ in range(2):
        layers += [nn.Conv2d(channels, width, 3, padding=1), nn.ReLU(), nn.BatchNorm2d(width)]
        channels = width
      layers += [nn.MaxPool2d(2), nn.Dropout(conv_dropout)]
    self.features = nn.Sequential(*layers)
    dense, size = [nn.Flatten()], _flat_size(self.features.eval(), image_shape)
    for width in (512, 1024):
      dense += [nn.Linear(size, width), nn.ReLU(), nn.BatchNorm1d(width), nn.Dropout(dense_dropout)]
      size = width
    self.classifier = nn.Sequential(*dense, nn.Linear(size, num_classes))

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.classifier(self.features(x))


def resnet18_cifar(num_classes: int = 10) -> nn.Module:
  """torchvision ResNet-18 with cnnjax's ``cifar_stem``: conv1 3x3 stride 1 pad 1, no max pool."""
  model = torchvision.models.resnet18(num_classes=num_classes)
  model.conv1 = nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False)
  model.maxpool = nn.Identity()
  return model


MODELS: dict[str, Callable[[tuple[int, int, int], int], nn.Module]] = {
    "seed_cnn": SeedCNN,
    "lenet": LeNet,
    "bn_cnn": BNCNN,
    "resnet18_cifar": lambda image_shape, num_classes: resnet18_cifar(num_classes),
}


def backbone(name: str) -> tuple[nn.Module, int]:
  """``(model, D)``: the ImageNet architecture ``name`` ('resnet18', 'efficientnet_lite0')
  without its classifier, mapping images ``[B, 3, H, W]`` to pooled features ``[B, D]``."""
  if name == "resnet18":
    model = torchvision.models.resnet18()
    model.fc = nn.Identity()
    return model, 512
  if name == "efficientnet_lite0":
    import efficientnet_lite_pytorch  # the model class of the package weights
    model = efficientnet_lite_pytorch.EfficientNet.from_name("efficientnet-lite0")
    model._dropout, model._fc = nn.Identity(), nn.Identity()
    return model, 1280
  raise ValueError(f"no torch backbone {name!r}; expected 'resnet18' or 'efficientnet_lite0'")


def head(features: int, num_classes: int, dropout: float) -> nn.Module:
  """cnnjax ``Head`` without hidden layers: dropout, dense; ``[B, D]`` -> ``[B, num_classes]``."""
  return nn.Sequential(nn.Dropout(dropout), nn.Linear(features, num_classes))


def build(kind: str, name: str, model: str, image_shape: tuple[int, int, int],
          num_classes: int, dropout: float) -> tuple[nn.Module | None, nn.Module | None]:
  """``(base, top)`` of a bench row, as ``make_step`` takes them.

  Args:
    kind: 'train': ``top`` is ``MODELS[name]`` (no base); 'frozen': the backbone ``model``
      and a new ``head`` with ``dropout``; 'features': the backbone ``model`` alone.
    name: the row (a key of MODELS for 'train').
    model: the backbone of a 'frozen' or 'features' row.
    image_shape: ``[H, W, C]`` of the images.
    num_classes: outputs of the model or head.
    dropout: the head's dropout rate.
  """
  if kind == "train":
    return None, MODELS[name](image_shape, num_classes)
  base, features = backbone(model)
  return base, head(features, num_classes, dropout) if kind == "frozen" else None


def make_conv_step(x_shape: tuple[int, int, int, int], kernel_shape: tuple[int, int, int, int],
                   strides: tuple[int, int], pads: list[tuple[int, int]]) -> Callable[[], int]:
  """One forward and both gradients of a convolution (``sum(conv(x, w) * r)`` backward
  with respect to ``x`` and ``w``, fixed random float32 operands in channels_last), as
  ``python -m benchmarks --mode=convs`` times the JAX lowerings; returns the batch size.

  Args:
    x_shape: input ``[B, H, W, Cin]`` (run as ``[B, Cin, H, W]`` in channels_last).
    kernel_shape: ``[kh, kw, Cin, Cout]``.
    strides: ``(sh, sw)``.
    pads: ``[(top, bottom), (left, right)]``; unequal sides are padded before the conv.
  """
  torch.set_num_threads(os.cpu_count())
  memory_format = torch.channels_last
  b, h, w, cin = x_shape
  kh, kw, _, cout = kernel_shape
  (top, bottom), (left, right) = pads
  gen = torch.Generator().manual_seed(0)
  x = torch.randn(b, cin, h, w, generator=gen).contiguous(memory_format=memory_format)
  weight = torch.randn(cout, cin, kh, kw, generator=gen).contiguous(memory_format=memory_format)
  x.requires_grad_(True)
  weight.requires_grad_(True)
  symmetric = top == bottom and left == right

  def conv(x: torch.Tensor) -> torch.Tensor:
    if not symmetric:
      x = nn.functional.pad(x, (left, right, top, bottom))
    return nn.functional.conv2d(x, weight, stride=strides,
                                padding=(top, left) if symmetric else 0)
  with torch.no_grad():
    r = torch.randn_like(conv(x)).contiguous(memory_format=memory_format)

  def step() -> int:
    x.grad = weight.grad = None
    (conv(x) * r).sum().backward()
    return b
  return step


def count_params(*modules: nn.Module | None) -> int:
  """Parameters (not buffers: batch norm statistics are left out, as in flax's 'params')."""
  return sum(p.numel() for m in modules if m is not None for p in m.parameters())


def make_step(kind: str, base: nn.Module | None, top: nn.Module | None, batch_size: int,
              image_shape: tuple[int, int, int], num_classes: int,
              variant: str) -> Callable[[], int]:
  """One step on a fixed synthetic batch, returning its number of images.

  Args:
    kind: 'train' (``top`` trains whole: model.train(), Adam over all its parameters),
      'frozen' (``base`` with requires_grad off in eval mode, ``top`` trains on its
      features) or 'features' (``base`` alone in eval mode under ``torch.inference_mode``).
    base, top: the modules the kind uses (the other may be None); moved to the variant's
      memory format in place (each variant takes a copy of its own).
    batch_size: images per step.
    image_shape: ``[H, W, C]``; the batch is uint8 ``[B, C, H, W]`` in the variant's memory
      format, normalised in the step (``(x - 127) / 64``) as the cnnjax step does.
    num_classes: labels are drawn from ``[0, num_classes)``.
    variant: a key of VARIANTS (memory format, bf16 autocast or not).
  Each call runs synchronously: the images are done when it returns.
  """
  if kind not in KINDS:
    raise ValueError(f"kind {kind!r}; expected one of {KINDS}")
  torch.set_num_threads(os.cpu_count())
  memory_format, dtype = VARIANTS[variant]
  height, width, channels = image_shape
  gen = torch.Generator().manual_seed(0)
  images = torch.randint(0, 256, (batch_size, channels, height, width), generator=gen,
                         dtype=torch.uint8).contiguous(memory_format=memory_format)
  labels = torch.randint(0, num_classes, (batch_size,), generator=gen)
  for module in (base, top):
    if module is not None:
      module.to(memory_format=memory_format)
  autocast = (lambda: torch.autocast("cpu", dtype=dtype)) if dtype else contextlib.nullcontext

  def normalized() -> torch.Tensor:
    return (images.float() - 127.0) / 64.0

  if kind == "features":
    base.eval()

    def infer() -> int:
      with torch.inference_mode(), autocast():
        base(normalized())
      return batch_size
    return infer

  if kind == "frozen":
    base.eval().requires_grad_(False)
  top.train()

  def forward(x: torch.Tensor) -> torch.Tensor:
    return top(base(x) if kind == "frozen" else x)
  optimizer = torch.optim.Adam(top.parameters(), lr=1e-3)

  def train() -> int:
    with autocast():
      loss = nn.functional.cross_entropy(forward(normalized()), labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return batch_size
  return train


def steps_of(request: dict[str, Any]) -> tuple[int | None, dict[str, Callable[[], int]]]:
  """``(params, {variant: step})`` of what ``request`` names.

  A model row (``row``, ``kind``, ``model``, ``image_shape``, ``batch_size``,
  ``num_classes``, ``dropout``: see ``build`` and ``make_step``) has every variant of
  VARIANTS, each on its own copy of the modules; a convolution (``conv``: the arguments of
  ``make_conv_step``) has one, 'f32 channels_last', and no parameter count.
  """
  if "conv" in request:
    c = request["conv"]
    return None, {"f32 channels_last": make_conv_step(
        tuple(c["x_shape"]), tuple(c["kernel_shape"]), tuple(c["strides"]),
        [tuple(p) for p in c["pads"]])}
  image_shape = tuple(request["image_shape"])
  modules = build(request["kind"], request["row"], request["model"], image_shape,
                  request["num_classes"], request["dropout"])
  return count_params(*modules), {
      variant: make_step(request["kind"], *copy.deepcopy(modules), request["batch_size"],
                         image_shape, request["num_classes"], variant)
      for variant in VARIANTS}


def serve(commands: IO[str], answers: IO[str]) -> None:
  """Answers ``benchmarks.harness.Peer``, one JSON line per line of ``commands``: the first
  is a request (``steps_of``), answered ``{'params', 'variants'}``; then ``{'variant',
  'warm_up': seconds}``, answered ``{}`` after that much untimed work, or ``{'variant',
  'window': seconds}``, answered ``{'rate', 'others'}`` (``harness.Local.window``). Ends at
  the end of ``commands``."""
  from benchmarks import harness  # pylint: disable=import-outside-toplevel
  params, steps = steps_of(json.loads(commands.readline()))
  sides = {variant: harness.Local(step, lambda: None) for variant, step in steps.items()}

  def answer(message: dict[str, Any]) -> None:
    answers.write(json.dumps(message) + "\n")
    answers.flush()
  answer({"params": params, "variants": list(sides)})
  for line in commands:
    command = json.loads(line)
    side = sides[command["variant"]]
    if "warm_up" in command:
      side.warm_up(command["warm_up"])
      answer({})
    else:
      rate, others = side.window(command["window"])
      answer({"rate": rate, "others": others})


if __name__ == "__main__":
  serve(sys.stdin, os.fdopen(int(sys.argv[1]), "w"))  # answers on the harness's own pipe
