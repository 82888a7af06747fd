r"""``--mode=convs``: the per-shape convolution lowering of ``cnnjax.models.conv`` on the
convolutions of the models, against plain lax and PyTorch.

  python -m benchmarks --mode=convs [--no_torch] [--windows 7] [--window_seconds 3]
      [--out FILE]

``CONV_SHAPES`` are taken from the models: BNCNN's eight, SeedCNN's two (batch 128,
32x32x3) and LeNet's two (64, 28x28x1); ResNet-18's layers with the CIFAR stem (128,
32x32x3: stem, each stage's strided 3x3 and 1x1 downsample, layer4 at 4x4), at 224x224
(batch 32: the 7x7/2 stem, layer1 at 56x56, layer4 at 7x7) and with the standard stem on
32x32 inputs (128: layer3 at 2x2, layer4 from 2x2 to 1x1 and at 1x1); EfficientNet-Lite0's
1x1 convolutions at 112, 56, 14 and 7 (batch 32). Each is timed as a jitted forward and
both gradients (``value_and_grad`` of ``sum(y * r)`` with respect to input and kernel,
fixed random float32 operands, one step in flight), once with ``lax.conv_general_dilated``
and once with ``cnnjax.models.conv.conv_general_dilated``, and, where torch is installed,
in a process of its own, the same work in PyTorch (``conv2d`` in float32 channels_last,
oneDNN's kernels), the three in turn (``harness.timed``). The table
shows the lowering ``cnnjax.models.conv.lowering`` picks (onednn, im2col or xla), ms per
step and GFLOP/s (3x the forward FLOPs) of each, the speedup of cnnjax over lax (a row
lowered to XLA times the same op twice, its ~1.0x a check of the noise) and cnnjax's speed
relative to PyTorch's.
"""
import dataclasses
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from benchmarks import harness
from benchmarks.harness import Measurement, Windows
from cnnjax.conv_math import conv_output_size
from cnnjax.models import conv


@dataclasses.dataclass(frozen=True)
class ConvSpec:
  """One ``--mode=convs`` row: a convolution of a cnnjax model, NHWC input by HWIO kernel.

  Attributes:
    title: the layer, e.g. 'BNCNN conv1'.
    x_shape: input ``[B, H, W, Cin]``.
    kernel_shape: ``[kh, kw, Cin, Cout]``.
    strides: ``(sh, sw)``.
    padding: as the model passes it: 'SAME', 'VALID' or ``((top, bottom), (left, right))``.
  """
  title: str
  x_shape: tuple[int, int, int, int]
  kernel_shape: tuple[int, int, int, int]
  strides: tuple[int, int]
  padding: str | tuple[tuple[int, int], tuple[int, int]]

  @property
  def pads(self) -> list[tuple[int, int]]:
    """``[(top, bottom), (left, right)]``."""
    if isinstance(self.padding, str):
      return lax.padtype_to_pads(self.x_shape[1:3], self.kernel_shape[:2], self.strides,
                                 self.padding)
    return list(self.padding)

  @property
  def out_shape(self) -> tuple[int, int, int, int]:
    """``[B, Ho, Wo, Cout]``."""
    b, h, w, _ = self.x_shape
    kh, kw, _, cout = self.kernel_shape
    (top, bottom), (left, right) = self.pads
    return (b, conv_output_size(h + top + bottom, kh, self.strides[0]),
            conv_output_size(w + left + right, kw, self.strides[1]), cout)

  @property
  def flops(self) -> int:
    """Of the forward pass: ``2 * B * Ho * Wo * kh * kw * Cin * Cout``."""
    return 2 * int(np.prod(self.out_shape[:3])) * int(np.prod(self.kernel_shape))

  def describe(self) -> str:
    """E.g. '128x32x32x64 -> 16x16x128, 3x3/2'."""
    b, h, w, cin = self.x_shape
    _, ho, wo, cout = self.out_shape
    kh, kw, _, _ = self.kernel_shape
    return f"{b}x{h}x{w}x{cin} -> {ho}x{wo}x{cout}, {kh}x{kw}/{self.strides[0]}"


PAD1 = ((1, 1), (1, 1))  # the 3x3 padding of BNCNN and ResNet


def _conv_spec(title: str, batch: int, size: int, cin: int, cout: int, kernel: int = 3,
               stride: int = 1, padding: Any = PAD1) -> ConvSpec:
  """A square ``kernel x kernel`` convolution of a ``[batch, size, size, cin]`` input."""
  return ConvSpec(title, (batch, size, size, cin), (kernel, kernel, cin, cout),
                  (stride, stride), padding)


CONV_SHAPES = (
    _conv_spec("BNCNN conv1", 128, 32, 3, 32),
    _conv_spec("BNCNN conv2", 128, 32, 32, 32),
    _conv_spec("BNCNN conv3", 128, 16, 32, 64),
    _conv_spec("BNCNN conv4", 128, 16, 64, 64),
    _conv_spec("BNCNN conv5", 128, 8, 64, 128),
    _conv_spec("BNCNN conv6", 128, 8, 128, 128),
    _conv_spec("BNCNN conv7", 128, 4, 128, 256),
    _conv_spec("BNCNN conv8", 128, 4, 256, 256),
    _conv_spec("SeedCNN conv1", 128, 32, 3, 8, padding="SAME"),
    _conv_spec("SeedCNN conv2", 128, 16, 8, 16, padding="SAME"),
    _conv_spec("LeNet conv1", 64, 28, 1, 6, kernel=5, padding=((2, 2), (2, 2))),
    _conv_spec("LeNet conv2", 64, 14, 6, 16, kernel=5, padding="VALID"),
    _conv_spec("ResNet-18 CIFAR stem", 128, 32, 3, 64),
    _conv_spec("ResNet-18 CIFAR layer1 3x3", 128, 32, 64, 64),
    _conv_spec("ResNet-18 CIFAR layer2 3x3/2", 128, 32, 64, 128, stride=2),
    _conv_spec("ResNet-18 CIFAR layer2 downsample", 128, 32, 64, 128, 1, 2, "VALID"),
    _conv_spec("ResNet-18 CIFAR layer2 3x3", 128, 16, 128, 128),
    _conv_spec("ResNet-18 CIFAR layer3 3x3/2", 128, 16, 128, 256, stride=2),
    _conv_spec("ResNet-18 CIFAR layer3 downsample", 128, 16, 128, 256, 1, 2, "VALID"),
    _conv_spec("ResNet-18 CIFAR layer3 3x3", 128, 8, 256, 256),
    _conv_spec("ResNet-18 CIFAR layer4 3x3/2", 128, 8, 256, 512, stride=2),
    _conv_spec("ResNet-18 CIFAR layer4 downsample", 128, 8, 256, 512, 1, 2, "VALID"),
    _conv_spec("ResNet-18 CIFAR layer4 3x3", 128, 4, 512, 512),
    _conv_spec("ResNet-18 224 stem 7x7/2", 32, 224, 3, 64, 7, 2, ((3, 3), (3, 3))),
    _conv_spec("ResNet-18 224 layer1 3x3", 32, 56, 64, 64),
    _conv_spec("ResNet-18 224 layer4 3x3", 32, 7, 512, 512),
    _conv_spec("ResNet-18 32x32 layer3 3x3", 128, 2, 256, 256),
    _conv_spec("ResNet-18 32x32 layer4 3x3/2", 128, 2, 256, 512, stride=2),
    _conv_spec("ResNet-18 32x32 layer4 3x3", 128, 1, 512, 512),
    _conv_spec("Lite0 stage2 expand 1x1", 32, 112, 16, 96, 1, padding="SAME"),
    _conv_spec("Lite0 stage2 project 1x1", 32, 56, 144, 24, 1, padding="SAME"),
    _conv_spec("Lite0 stage5 expand 1x1", 32, 14, 112, 672, 1, padding="SAME"),
    _conv_spec("Lite0 head 1x1", 32, 7, 320, 1280, 1, padding="SAME"),
)
CONV_DIMS = ("NHWC", "HWIO", "NHWC")
TORCH_VARIANT = "f32 channels_last"  # the one variant of a convolution's peer (torch_peers)


@dataclasses.dataclass
class ConvRow:
  """A ``--mode=convs`` row: one convolution's train-step work under each lowering.

  Attributes:
    spec: the convolution.
    lowering: how ``cnnjax.models.conv`` runs it here (``lowering``: onednn, im2col or xla,
      the last the same op as lax's).
    lax: ``lax.conv_general_dilated``, forward and both gradients.
    cnnjax: ``cnnjax.models.conv.conv_general_dilated``, forward and both gradients.
    torch: PyTorch's ``conv2d`` in float32 channels_last, the same work; None without torch.
  """
  spec: ConvSpec
  lowering: str
  lax: Measurement
  cnnjax: Measurement
  torch: Measurement | None = None

  @property
  def measurements(self) -> list[Measurement]:
    return [m for m in (self.lax, self.cnnjax, self.torch) if m is not None]


def _conv_dispatch(conv_fn: Callable[..., jax.Array], spec: ConvSpec) -> Callable[[], Any]:
  """Launches one jitted ``value_and_grad`` of ``sum(conv_fn(x, kernel) * r)`` with respect
  to ``x [B, H, W, Cin]`` and ``kernel [kh, kw, Cin, Cout]`` (``r [B, Ho, Wo, Cout]``; all
  fixed random normal float32); returns ``(loss, (dx, dkernel))``."""
  kx, kk, kr = jax.random.split(jax.random.key(0), 3)
  x, kernel = jax.random.normal(kx, spec.x_shape), jax.random.normal(kk, spec.kernel_shape)
  r = jax.random.normal(kr, spec.out_shape)

  def loss(x: jax.Array, kernel: jax.Array, r: jax.Array) -> jax.Array:
    y = conv_fn(x, kernel, spec.strides, spec.padding, dimension_numbers=CONV_DIMS)
    return jnp.sum(y * r)
  step = jax.jit(jax.value_and_grad(loss, (0, 1)))
  return lambda: step(x, kernel, r)


def _conv_row(spec: ConvSpec, with_torch: bool, windows: Windows, notes: list[str]) -> ConvRow:
  """Measures ``spec`` with lax's lowering, with cnnjax's and (``with_torch``) with PyTorch's
  float32 channels_last convolution in a process of its own, in turn
  (``harness.timed_against_peer``; if the peer fails, a note says why and the torch cells
  stay empty)."""
  batch_size = spec.x_shape[0]
  sides = {name: harness.jax_side(_conv_dispatch(fn, spec), batch_size)[0]
           for name, fn in (("lax", lax.conv_general_dilated),
                            ("cnnjax", conv.conv_general_dilated))}
  request = {"conv": {"x_shape": spec.x_shape, "kernel_shape": spec.kernel_shape,
                      "strides": spec.strides, "pads": spec.pads}}
  measured = harness.timed_against_peer(sides, request if with_torch else None, batch_size,
                                        windows, spec.title, notes)
  return ConvRow(spec, conv.lowering(spec.x_shape, spec.kernel_shape, spec.strides, spec.pads),
                 measured["lax"], measured["cnnjax"], measured.get(f"torch {TORCH_VARIANT}"))


def conv_rows(with_torch: bool, windows: Windows, notes: list[str]) -> Iterator[ConvRow]:
  """The rows of ``CONV_SHAPES``, one after the other (``notes`` gets what went wrong)."""
  for spec in CONV_SHAPES:
    yield _conv_row(spec, with_torch, windows, notes)


def _step_ms(m: Measurement) -> float:
  """Milliseconds per step of ``m``: ``1000 * batch / median images/s``."""
  return 1000.0 * m.batch_size / m.images_per_second


def _ms_figure(m: Measurement) -> str:
  return f"{_step_ms(m):.2f}" + (" (busy)" if m.busy else "")


CONV_HEADER = [
    "| convolution | input -> output, kernel/stride | lowering | lax ms/step | cnnjax ms/step "
    "| torch ms/step | lax GFLOP/s | cnnjax GFLOP/s | torch GFLOP/s | speedup | cnnjax / torch "
    "| windows kept |",
    "|---|---|---|---|---|---|---|---|---|---|---|---|"]


def format_conv_row(r: ConvRow) -> str:
  """A markdown table row of ``r``: figures with no quiet window are marked busy; the torch
  cells are '-' without torch."""
  def gflops(m: Measurement | None) -> str:
    return "-" if m is None else f"{3 * r.spec.flops / _step_ms(m) / 1e6:.1f}"
  torch_ms = "-" if r.torch is None else _ms_figure(r.torch)
  versus = "-" if r.torch is None else f"{_step_ms(r.torch) / _step_ms(r.cnnjax):.2f}x"
  return (f"| {r.spec.title} | {r.spec.describe()} | {r.lowering} | "
          f"{_ms_figure(r.lax)} | {_ms_figure(r.cnnjax)} | {torch_ms} | {gflops(r.lax)} | "
          f"{gflops(r.cnnjax)} | {gflops(r.torch)} | "
          f"{_step_ms(r.lax) / _step_ms(r.cnnjax):.2f}x | {versus} | "
          f"{harness.windows_kept(r.measurements)} |")


CONV_NOTE = ("Each row times a jitted `jax.value_and_grad` of `sum(conv(x, kernel) * r)` with "
             "respect to `x` and `kernel` (the forward and both gradients, as in a train step) "
             "on fixed random float32 operands, NHWC/HWIO with the model's strides and padding, "
             "conv = `lax.conv_general_dilated` (lax) or `cnnjax.models.conv."
             "conv_general_dilated` (cnnjax), one step in flight; lowering = what "
             "`lowering` picks for cnnjax (xla: both time the same op, ~1.0x). ms/step = "
             "1000 x batch / median images/s; GFLOP/s = 3 x the forward FLOPs "
             "(2 x B x Ho x Wo x kh x kw x Cin x Cout) per step; speedup = lax ms / cnnjax ms. "
             "torch: PyTorch's eager `conv2d` on the same shapes in float32 channels_last "
             "(oneDNN), forward and `backward()` to input and weight, `os.cpu_count()` "
             "threads, in a process of its own per row, its windows taken in turn with lax's and "
             "cnnjax's; cnnjax / torch = torch ms / cnnjax ms "
             "(> 1: cnnjax faster).")
