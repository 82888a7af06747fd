r"""Throughput benchmarks on this machine, printed and appended to BENCHMARKS.md.

  python -m experiments.bench --input [--source ../shared/data/cifar10.npz]
      [--folder ../shared/data/hymenoptera/train] [--workers 2] [--windows 7]
      [--window_seconds 3] [--out BENCHMARKS.md]

``--input`` measures the training input pipelines (``cnnjax.data.pipeline``), in-process
and with ``--workers`` worker processes: CIFAR-10 with crop (pad 4) + flip at each of
``--batch_sizes``, the Keras ``ImageDataGenerator`` set (rotation 40, shifts 0.2, shear
0.2, zoom 0.2, flip, nearest fill), and an image folder decoded per record with a random
resized crop to 224 + flip. In the same run it measures what the ``--step_model`` (BN CNN)
train step consumes (synthetic batches, at each of ``--batch_sizes``) and prints the ratio
pipeline / train step, whose target is >= 3.

  python -m experiments.bench --models [--only seed_cnn,lenet,...] [--no_torch]
      [--model_batches lite0_frozen=16,...] [--windows 7] [--window_seconds 3]
      [--out BENCHMARKS.md]

``--models`` measures the images/s of a train step of each cnnjax model against the same
architecture in PyTorch, in one run: SeedCNN (batch 128, 32x32x3), LeNet (64, 28x28x1),
BNCNN (128, 32x32x3), ResNet-18 with the CIFAR stem (128, 32x32x3), and at 224x224 (batch
32) ResNet-18 and EfficientNet-Lite0 with a frozen base (the 'frozen' workflow of
experiments/configs/transfer_base.py: only the new head trains) and as feature extractors
(the backbone's inference alone); 10 classes, one synthetic uint8 batch reused, normalised
inside the step on both sides. The JAX
figure is the step a training runs (``cnnjax.train.Runner``: jit, donated state, Adam,
dropout rng, batch norm in train mode, the frozen base frozen by the ``optimizer.groups``
rules and run in inference mode), one step in flight; its first call (trace + compile +
one step) is reported apart as the compile time. The PyTorch peers
(experiments/torch_peers.py, only when torch is importable) run eagerly on
``os.cpu_count()`` threads with Adam in ``model.train()`` (a frozen base in ``eval()``
without gradients; a feature extractor in ``eval()`` under ``torch.inference_mode()``), in
float32 NCHW, float32 channels_last and bf16 autocast channels_last; the table shows the
faster float32 layout, bf16, and JAX's ratio to each. The parameter counts of both sides
must agree (they are in the table); a row that cannot be built or measured is left out
with a note saying why.

  python -m experiments.bench --convs [--no_torch] [--windows 7] [--window_seconds 3]
      [--out BENCHMARKS.md]

``--convs`` measures the per-shape convolution lowering of ``cnnjax.models.conv`` on the
convolutions of ``CONV_SHAPES``, taken from the models: BNCNN's eight, SeedCNN's two (batch
128, 32x32x3) and LeNet's two (64, 28x28x1); ResNet-18's layers with the CIFAR stem (128,
32x32x3: stem, each stage's strided 3x3 and 1x1 downsample, layer4 at 4x4), at 224x224
(batch 32: the 7x7/2 stem, layer1 at 56x56, layer4 at 7x7) and with the standard stem on
32x32 inputs (128: layer3 at 2x2, layer4 from 2x2 to 1x1 and at 1x1); EfficientNet-Lite0's
1x1 convolutions at 112, 56, 14 and 7 (batch 32). Each is timed as a jitted forward and both
gradients (``value_and_grad`` of ``sum(y * r)`` with respect to input and kernel, fixed
random float32 operands, one step in flight), once with ``lax.conv_general_dilated`` and
once with ``cnnjax.models.conv.conv_general_dilated``, and, when torch is importable, the
same work in PyTorch (``conv2d`` in float32 channels_last, oneDNN's kernels). The table
shows the lowering ``cnnjax.models.conv.lowering`` picks (onednn, im2col or xla), ms per step and GFLOP/s (3x the forward FLOPs) of
each, the speedup of cnnjax over lax (a row lowered to XLA times the same op twice, its
~1.0x a check of the noise) and cnnjax's speed relative to PyTorch's.

Every figure is the median of steady-state windows after a warm-up. The CPU time that
other processes (all but this one and its workers) used during each window is read from
/proc; a window is kept only when they used less than ``--quiet_cores`` cores. When no
window of a row was quiet, the row shows the median of all windows and is marked busy:
such a figure is a lower bound, not a measurement of this code.
"""
import argparse
import dataclasses
import datetime
import importlib.metadata
import os
import platform
import statistics
import sys
import time
import types
from typing import Any, Callable, Iterator

import cnnjax  # noqa: F401  (XLA CPU defaults before JAX starts)
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from cnnjax import onednn, optim, train
from cnnjax.data import folders, pipeline, sources
from cnnjax.data.augment import KerasAugment
from cnnjax.errors import UserError
from cnnjax.models import conv, create_model
from experiments.configs import transfer_base
from jax import lax

KERAS_AUGMENT = {"rotation": 40.0, "width_shift": 0.2, "height_shift": 0.2, "shear": 0.2,
                 "zoom": 0.2, "horizontal_flip": True, "fill_mode": "nearest"}
PIPELINE_TARGET = 3.0  # the train pipeline must deliver >= 3x what the train step consumes
NUM_CLASSES = 10  # of the synthetic labels, every model and head


@dataclasses.dataclass
class Measurement:
  """One row: items (images) per second over windows, with the other processes' load.

  Attributes:
    name: what was measured.
    batch_size: images per batch.
    workers: worker processes of the input pipeline (0: in-process); None for a train step.
    rates: images/second of each window.
    others: cores used by other processes during each window.
    quiet_cores: a window is kept when ``others`` < this.
    first_batch_seconds: time to the first batch (pipeline start, e.g. spawning workers).
  """
  name: str
  batch_size: int
  workers: int | None
  rates: list[float]
  others: list[float]
  quiet_cores: float
  first_batch_seconds: float | None = None

  @property
  def kept(self) -> list[float]:
    return [r for r, o in zip(self.rates, self.others) if o < self.quiet_cores]

  @property
  def busy(self) -> bool:
    """True when no window was quiet: the figure is then the median of all windows."""
    return not self.kept

  @property
  def images_per_second(self) -> float:
    return statistics.median(self.kept or self.rates)


def _cpu_ticks() -> tuple[int, int]:
  """``(busy ticks of the whole machine, ticks of this process and its descendants)``."""
  with open("/proc/stat") as f:
    fields = [int(v) for v in f.readline().split()[1:9]]
  user, nice, system, _, _, irq, softirq, steal = fields  # idle and iowait left out
  machine = user + nice + system + irq + softirq + steal
  parent, ticks = {}, {}
  for entry in os.scandir("/proc"):
    if not entry.name.isdigit():
      continue
    try:
      with open(f"/proc/{entry.name}/stat") as f:
        stat = f.read()
    except OSError:  # the process ended while scanning
      continue
    rest = stat[stat.rindex(")") + 2:].split()  # fields after "pid (comm) "
    pid = int(entry.name)
    parent[pid] = int(rest[1])
    ticks[pid] = int(rest[11]) + int(rest[12])  # utime + stime
  ours, frontier = set(), {os.getpid()}
  while frontier:
    ours |= frontier
    frontier = {p for p, pp in parent.items() if pp in frontier and p not in ours}
  return machine, sum(ticks.get(p, 0) for p in ours)


def measure(step: Callable[[], int], sync: Callable[[], None], windows: int,
            window_seconds: float, warmup_seconds: float) -> tuple[list[float], list[float]]:
  """Runs ``step`` (returning the images it did) in timed windows after a warm-up.

  Args:
    step: does one unit of work and returns its number of images.
    sync: waits for asynchronous work (a dispatched train step) to finish.
    windows: number of windows.
    window_seconds: length of each window (it ends after the step that crosses it).
    warmup_seconds: untimed work first (compilation, filling prefetch buffers).
  Returns:
    ``(rates, others)``: images/second and the cores other processes used, per window.
  """
  hz = os.sysconf("SC_CLK_TCK")
  start = time.perf_counter()
  while time.perf_counter() - start < warmup_seconds:
    step()
  sync()
  rates, others = [], []
  for _ in range(windows):
    machine0, ours0 = _cpu_ticks()
    start, images = time.perf_counter(), 0
    while time.perf_counter() - start < window_seconds:
      images += step()
    sync()
    seconds = time.perf_counter() - start
    machine1, ours1 = _cpu_ticks()
    rates.append(images / seconds)
    others.append(max(0.0, (machine1 - machine0) - (ours1 - ours0)) / hz / seconds)
  return rates, others


def _pipeline_row(name: str, ds, batch_size: int, workers: int,
                  args: argparse.Namespace) -> Measurement:
  """Images/second delivered by ``prefetch(ds.repeat(), workers)``."""
  start = time.perf_counter()
  batches = pipeline.prefetch(ds.repeat(), workers=workers)
  next(batches)
  first = time.perf_counter() - start
  rates, others = measure(lambda: len(next(batches)["label"]), lambda: None, args.windows,
                          args.window_seconds, args.warmup_seconds)
  batches.close()
  return Measurement(name, batch_size, workers, rates, others, args.quiet_cores, first)


def _timed_jax(name: str, dispatch: Callable[[], Any], batch_size: int,
               args: argparse.Namespace) -> tuple[Measurement, float]:
  """Measures ``dispatch`` (launches one jitted call on a batch, returns its outputs) with
  one call in flight, as in the training loop.

  Returns the measurement and the seconds of the first call (trace, compile, one run).
  """
  start = time.perf_counter()
  held = [jax.block_until_ready(dispatch())]
  first = time.perf_counter() - start

  def step() -> int:
    previous, held[0] = held[0], dispatch()
    jax.block_until_ready(previous)
    return batch_size

  rates, others = measure(step, lambda: jax.block_until_ready(held[0]), args.windows,
                          args.window_seconds, args.warmup_seconds)
  return Measurement(name, batch_size, None, rates, others, args.quiet_cores), first


def _timed_torch(name: str, step: Callable[[], int], batch_size: int,
                 args: argparse.Namespace) -> Measurement:
  """Measures a synchronous torch ``step`` (``torch_peers``: returns when its images are done)."""
  rates, others = measure(step, lambda: None, args.windows, args.window_seconds,
                          args.warmup_seconds)
  return Measurement(name, batch_size, None, rates, others, args.quiet_cores)


def _count(params: Any) -> int:
  return sum(int(np.size(leaf)) for leaf in jax.tree.leaves(params))


def _synthetic_batch(batch_size: int, image_shape: tuple[int, ...]) -> dict[str, np.ndarray]:
  """uint8 images ``[B, H, W, C]`` and labels ``[B]`` in ``[0, NUM_CLASSES)``."""
  rng = np.random.default_rng(0)
  return {"image": rng.integers(0, 256, (batch_size, *image_shape), np.uint8),
          "label": rng.integers(0, NUM_CLASSES, batch_size)}


def _normalize(channels: int) -> Callable[[jax.Array], jax.Array]:
  return train.make_normalize(np.full(channels, 127.0), np.full(channels, 64.0))


def _train_dispatch(model: nn.Module, groups: tuple[str, ...], batch: dict[str, np.ndarray],
                    ) -> tuple[Callable[[], Any], int]:
  """``(dispatch, parameters)``: ``cnnjax.train.Runner``'s train step (jit, donated state,
  Adam at the config defaults, dropout rng, batch norm in train mode) of ``model`` on
  ``batch``; the modules the ``optimizer.groups`` rules ``groups`` freeze get no updates
  and run in inference mode, as ``train.setup`` arranges. ``dispatch`` runs one step."""
  cfg = optim.default_optimizer_config()
  cfg.groups = groups
  tx = optim.make_optimizer(cfg, optax.constant_schedule(cfg.lr))
  state = train.create_train_state(model, tx, batch["image"].shape[1:], seed=0)
  runner = train.Runner.create(_normalize(batch["image"].shape[-1]),
                               frozen=optim.frozen_modules(state.params, groups))
  held = {"state": runner.put_state(state)}
  batch = runner.to_global(batch)

  def dispatch() -> dict[str, jax.Array]:
    held["state"], sums = runner.train_step(held["state"], batch)
    return sums
  return dispatch, _count(state.params)


def _features_dispatch(backbone: nn.Module, batch: dict[str, np.ndarray],
                       ) -> tuple[Callable[[], Any], int]:
  """``(dispatch, parameters)``: the backbone in inference mode on ``batch``'s images, as
  ``cnnjax.transfer.extract_features`` runs it; ``dispatch`` returns features ``[B, D]``."""
  images = jnp.asarray(batch["image"])
  dummy = jnp.zeros((1, *images.shape[1:]), jnp.float32)
  variables = jax.jit(lambda: backbone.init(jax.random.PRNGKey(0), dummy, train=False))()
  normalize = _normalize(images.shape[-1])
  apply = jax.jit(lambda v, x: backbone.apply(v, normalize(x), train=False))
  return lambda: apply(variables, images), _count(variables["params"])


def _train_step_row(batch_size: int, args: argparse.Namespace) -> Measurement:
  """Images/second the ``--step_model`` train step consumes (Adam, synthetic CIFAR-shaped
  batches), as ``cnnjax.train.Runner`` runs it."""
  dispatch, _ = _train_dispatch(create_model(args.step_model, num_classes=NUM_CLASSES), (),
                                _synthetic_batch(batch_size, (32, 32, 3)))
  return _timed_jax(f"{args.step_model} train step (synthetic)", dispatch, batch_size, args)[0]


def input_rows(args: argparse.Namespace) -> Iterator[Measurement]:
  """The ``--input`` rows, measured one after the other."""
  train_data = sources.load(args.source).train
  folder = folders.ImageFolder(args.folder)
  workers = [0] + ([args.workers] if args.workers else [])
  crop_flip = KerasAugment(crop_padding=4, horizontal_flip=True)
  largest = max(args.batch_sizes)
  for b in args.batch_sizes:
    for w in workers if b == largest else [0]:
      yield _pipeline_row("CIFAR-10 crop + flip", pipeline.train_epoch(train_data, b, 0, 0, crop_flip),
                          b, w, args)
  for w in workers:
    yield _pipeline_row("CIFAR-10 Keras set", pipeline.train_epoch(
        train_data, largest, 0, 0, KerasAugment(**KERAS_AUGMENT)), largest, w, args)
  flip = KerasAugment(horizontal_flip=True)
  name = "/".join(folder.root.resolve().parts[-2:])
  for w in workers:
    ds = pipeline.folder_epoch(folder, args.folder_batch_size, 0, 0, 224, flip)
    yield _pipeline_row(f"{name} decode + resized crop 224 + flip", ds,
                        args.folder_batch_size, w, args)
  for b in args.batch_sizes:
    yield _train_step_row(b, args)


def ratios(rows: list[Measurement]) -> list[str]:
  """``pipeline / train step`` at each batch size measured for both (target >= 3x)."""
  lines = []
  steps = {r.batch_size: r for r in rows if r.workers is None}
  for r in rows:
    if r.name == "CIFAR-10 crop + flip" and r.workers == 0 and r.batch_size in steps:
      step = steps[r.batch_size]
      ratio = r.images_per_second / step.images_per_second
      verdict = "meets" if ratio >= PIPELINE_TARGET else "MISSES"
      busy = " (busy windows)" if r.busy or step.busy else ""
      lines.append(f"batch {r.batch_size}: CIFAR-10 crop + flip pipeline / {step.name} = "
                   f"{r.images_per_second:,.0f} / {step.images_per_second:,.0f} = {ratio:.1f}x, "
                   f"{verdict} the >= {PIPELINE_TARGET:.0f}x target{busy}")
  return lines


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """One ``--models`` row.

  Attributes:
    title: the row's name in the table.
    kind: 'train' (the whole model trains from scratch), 'frozen' (the 'frozen' workflow of
      experiments/configs/transfer_base.py: the backbone frozen by ``optimizer.groups``,
      its new head trains) or 'features' (the backbone alone, inference: feature extraction).
    model: the cnnjax model of a 'train' row, else the backbone.
    image_shape: ``[H, W, C]`` of the synthetic images.
    batch_size: images per step unless ``--model_batches`` says otherwise.
    options: ``create_model`` options of a 'train' row.
  """
  title: str
  kind: str
  model: str
  image_shape: tuple[int, int, int]
  batch_size: int
  options: dict[str, Any] = dataclasses.field(default_factory=dict)


MODEL_ROWS = {
    "seed_cnn": ModelSpec("SeedCNN", "train", "seed_cnn", (32, 32, 3), 128),
    "lenet": ModelSpec("LeNet", "train", "lenet", (28, 28, 1), 64),
    "bn_cnn": ModelSpec("BNCNN", "train", "bn_cnn", (32, 32, 3), 128),
    "resnet18_cifar": ModelSpec("ResNet-18 CIFAR stem", "train", "resnet18", (32, 32, 3), 128,
                                {"cifar_stem": True}),
    "resnet18_frozen": ModelSpec("ResNet-18 224 frozen base", "frozen", "resnet18",
                                 (224, 224, 3), 32),
    "resnet18_features": ModelSpec("ResNet-18 224 feature extractor", "features", "resnet18",
                                   (224, 224, 3), 32),
    "lite0_frozen": ModelSpec("EfficientNet-Lite0 224 frozen base", "frozen",
                              "efficientnet_lite0", (224, 224, 3), 32),
    "lite0_features": ModelSpec("EfficientNet-Lite0 224 feature extractor", "features",
                                "efficientnet_lite0", (224, 224, 3), 32),
}
BF16 = "bf16 channels_last"  # the torch variant (torch_peers.VARIANTS) compared apart


@dataclasses.dataclass
class ModelRow:
  """A ``--models`` row: the cnnjax step and its PyTorch peers on the same architecture.

  Attributes:
    spec: what was measured.
    batch_size: images per step.
    params: parameters of the model (of the backbone for a 'features' row), the same in both.
    jax: the cnnjax step.
    compile_seconds: its first call: trace, compile and one step.
    torch: torch variant (``torch_peers.VARIANTS``) -> its measurement; empty without torch.
  """
  spec: ModelSpec
  batch_size: int
  params: int
  jax: Measurement
  compile_seconds: float
  torch: dict[str, Measurement]

  @property
  def measurements(self) -> list[Measurement]:
    return [self.jax, *self.torch.values()]

  def best_f32(self) -> tuple[str, Measurement] | None:
    """The faster float32 torch variant and its measurement."""
    f32 = [(v, m) for v, m in self.torch.items() if v != BF16]
    return max(f32, key=lambda vm: vm[1].images_per_second) if f32 else None


def _jax_model(spec: ModelSpec) -> tuple[nn.Module, tuple[str, ...]]:
  """The model a training of ``spec`` builds and its ``optimizer.groups``; a 'frozen' or
  'features' row takes both from transfer_base's workflow of that name (a 'transfer' model)."""
  if spec.kind == "train":
    return create_model(spec.model, num_classes=NUM_CLASSES, **spec.options), ()
  c = transfer_base.transfer_config(spec.model, spec.kind)
  c.model.num_classes = NUM_CLASSES
  return train.model_from_config(c.model), tuple(c.optimizer.groups)


def _model_row(name: str, peers: types.ModuleType | None,
               args: argparse.Namespace) -> ModelRow:
  """Builds the cnnjax model of row ``name`` and its torch peer (``peers``: the
  torch_peers module, or None), checks that their parameter counts agree, then measures
  the cnnjax step and each torch variant."""
  spec = MODEL_ROWS[name]
  batch_size = args.model_batches.get(name, spec.batch_size)
  batch = _synthetic_batch(batch_size, spec.image_shape)
  model, groups = _jax_model(spec)
  if spec.kind == "features":
    dispatch, params = _features_dispatch(model.backbone_model(), batch)
  else:
    dispatch, params = _train_dispatch(model, groups, batch)
  base = top = None
  if peers is not None:
    base, top = peers.build(spec.kind, name, spec.model, spec.image_shape, NUM_CLASSES,
                            getattr(model, "dropout_rate", 0.0))
    if peers.count_params(base, top) != params:
      raise RuntimeError(f"parameter counts differ: cnnjax {params:,}, torch "
                         f"{peers.count_params(base, top):,}; expected the same architecture")
  jax_row, compile_seconds = _timed_jax(f"{spec.title} JAX", dispatch, batch_size, args)
  del dispatch  # frees the train state before torch runs
  torch_rows = {}
  for variant in peers.VARIANTS if peers is not None else ():
    step = peers.make_step(spec.kind, base, top, batch_size, spec.image_shape, NUM_CLASSES,
                           variant)
    torch_rows[variant] = _timed_torch(f"{spec.title} torch {variant}", step, batch_size, args)
  return ModelRow(spec, batch_size, params, jax_row, compile_seconds, torch_rows)


def _torch_peers(args: argparse.Namespace, notes: list[str]) -> types.ModuleType | None:
  """The experiments.torch_peers module, or None (a note says why) without torch."""
  if args.no_torch:
    return None
  try:
    from experiments import torch_peers
  except ImportError as e:
    _note(notes, f"PyTorch not importable ({e}): cnnjax figures only")
    return None
  return torch_peers


def _note(notes: list[str], text: str) -> None:
  print(text, flush=True)
  notes.append(text)


def model_rows(args: argparse.Namespace, notes: list[str]) -> Iterator[ModelRow]:
  """The ``--models`` rows of ``--only``, one after the other; a row that fails is left out
  with a note saying why."""
  peers = _torch_peers(args, notes)
  for name in args.only:
    try:
      yield _model_row(name, peers, args)
    except Exception as e:  # noqa: BLE001  (one row's failure must not stop the others)
      message = (str(e).strip().splitlines() or [""])[0][:300]
      _note(notes, f"{name}: not measured ({type(e).__name__}: {message})")


def _figure(m: Measurement | None, detail: str = "") -> str:
  """``m``'s images/s, with ``detail`` and 'busy' (no quiet window) in parentheses."""
  if m is None:
    return "-"
  rate = m.images_per_second
  remarks = ", ".join(filter(None, [detail, "busy" if m.busy else ""]))
  text = f"{rate:,.0f}" if rate >= 100 else f"{rate:.1f}"
  return text + (f" ({remarks})" if remarks else "")


def _ratio(jax_row: Measurement, torch_row: Measurement | None) -> str:
  if torch_row is None:
    return "-"
  return f"{jax_row.images_per_second / torch_row.images_per_second:.2f}x"


MODEL_HEADER = [
    "| model | batch | params | JAX img/s | JAX compile (s) | torch f32 img/s (layout) "
    "| torch bf16 img/s | JAX / torch f32 | JAX / torch bf16 | windows kept |",
    "|---|---|---|---|---|---|---|---|---|---|"]


def format_model_row(r: ModelRow) -> str:
  """A markdown table row of ``r``: figures with no quiet window are marked busy."""
  best = r.best_f32()
  f32 = "-" if best is None else _figure(best[1], best[0].split()[1])
  bf16 = r.torch.get(BF16)
  return (f"| {r.spec.title} | {r.batch_size} | {r.params:,} | {_figure(r.jax)} | "
          f"{r.compile_seconds:.1f} | {f32} | {_figure(bf16)} | "
          f"{_ratio(r.jax, best[1] if best else None)} | {_ratio(r.jax, bf16)} | "
          f"{_windows_kept(r.measurements)} |")


def _windows_kept(measurements: list[Measurement]) -> str:
  """'kept/all' windows over ``measurements``."""
  return (f"{sum(len(m.kept) for m in measurements)}/"
          f"{sum(len(m.rates) for m in measurements)}")


def model_notes(rows: list[ModelRow]) -> list[str]:
  """How the ``--models`` figures were taken, and every torch variant's figure per row."""
  notes = ["JAX: the cnnjax train step (`cnnjax.train.Runner`: jit, donated state, Adam, "
           "dropout rng, batch norm in train mode; a frozen base frozen by the 'frozen' "
           "workflow's `optimizer.groups`) or, for a feature extractor, the backbone's jitted "
           "inference, on one synthetic uint8 batch normalised in the step; compile = its first "
           "call (trace + compile + one step), before the warm-up. PyTorch (experiments/"
           "torch_peers.py): the same architecture and parameter count, eager, "
           "`torch.set_num_threads(os.cpu_count())`, Adam, `model.train()`, backward, step; a "
           "frozen base in eval mode without gradients; a feature extractor in eval mode under "
           "`torch.inference_mode()`."]
  for r in rows:
    if r.torch:
      figures = ", ".join(f"{v} {_figure(m)}" for v, m in r.torch.items())
      notes.append(f"{r.spec.title}: torch img/s {figures}")
  return notes


@dataclasses.dataclass(frozen=True)
class ConvSpec:
  """One ``--convs`` row: a convolution of a cnnjax model, NHWC input by HWIO kernel.

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
    return (b, (h + top + bottom - kh) // self.strides[0] + 1,
            (w + left + right - kw) // self.strides[1] + 1, cout)

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


@dataclasses.dataclass
class ConvRow:
  """A ``--convs`` row: one convolution's train-step work under both lowerings.

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


def _conv_row(spec: ConvSpec, peers: types.ModuleType | None,
              args: argparse.Namespace) -> ConvRow:
  """Measures ``spec`` with lax's lowering, with cnnjax's, then (``peers``: the
  torch_peers module, or None) with PyTorch's float32 channels_last convolution."""
  timed = {name: _timed_jax(f"{spec.title} {name}", _conv_dispatch(fn, spec), spec.x_shape[0],
                            args)[0]
           for name, fn in (("lax", lax.conv_general_dilated),
                            ("cnnjax", conv.conv_general_dilated))}
  if peers is not None:
    step = peers.make_conv_step(spec.x_shape, spec.kernel_shape, spec.strides, spec.pads)
    timed["torch"] = _timed_torch(f"{spec.title} torch", step, spec.x_shape[0], args)
  return ConvRow(spec, conv.lowering(spec.x_shape, spec.kernel_shape, spec.strides,
                                     spec.pads), **timed)


def conv_rows(args: argparse.Namespace, notes: list[str]) -> Iterator[ConvRow]:
  """The ``--convs`` rows of ``CONV_SHAPES``, one after the other."""
  peers = _torch_peers(args, notes)
  for spec in CONV_SHAPES:
    yield _conv_row(spec, peers, args)


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
          f"{_windows_kept(r.measurements)} |")


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
             "threads; cnnjax / torch = torch ms / cnnjax ms (> 1: cnnjax faster).")


PACKAGES = ("flax", "grain", "numpy", "pillow", "onednn-cpu-gomp")
TORCH_PACKAGES = ("torch", "torchvision", "efficientnet-lite-pytorch")


def machine(packages: tuple[str, ...] = PACKAGES) -> dict[str, str]:
  """The CPU, its cores and the versions that matter for the figures (of the installed
  ``packages``)."""
  model = "unknown CPU"
  with open("/proc/cpuinfo") as f:
    for line in f:
      if line.startswith("model name"):
        model = line.split(":", 1)[1].strip()
        break
  versions = {"python": platform.python_version(), "jax": jax.__version__}
  for p in packages:
    try:
      versions[p] = importlib.metadata.version(p)
    except importlib.metadata.PackageNotFoundError:
      continue
  return {"cpu": f"{model}, {os.cpu_count()} cores ({len(os.sched_getaffinity(0))} usable)",
          "versions": ", ".join(f"{k} {v}" for k, v in versions.items()),
          "xla_flags": os.environ.get("XLA_FLAGS", ""),
          "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
          "kernels": ("oneDNN convolutions and batch norm (cnnjax.onednn)" if onednn.available()
                      else f"XLA's (oneDNN unavailable: {onednn.unavailable_reason()})")}


def format_row(r: Measurement) -> str:
  """A markdown table row of ``r``."""
  workers = "-" if r.workers is None else ("in-process" if r.workers == 0 else str(r.workers))
  kept = f"{len(r.kept)}/{len(r.rates)}" + (" busy: all windows" if r.busy else "")
  first = "-" if r.first_batch_seconds is None else f"{r.first_batch_seconds:.2f}"
  others = f"{min(r.others):.2f}-{max(r.others):.2f}"
  return (f"| {r.name} | {r.batch_size} | {workers} | {r.images_per_second:,.0f} | {kept} | "
          f"{others} | {first} |")


INPUT_HEADER = [
    "| benchmark | batch | workers | images/s | windows kept | other processes (cores) "
    "| first batch (s) |",
    "|---|---|---|---|---|---|---|"]


def _packages(args: argparse.Namespace) -> tuple[str, ...]:
  return PACKAGES + (TORCH_PACKAGES if args.models and not args.no_torch else ())


def report(title: str, command: str, rows: list[Measurement], table: list[str],
           notes: list[str], args: argparse.Namespace) -> str:
  """The markdown section for BENCHMARKS.md: command, machine, versions, method, the
  markdown ``table`` (header and rows) and ``notes``; ``rows`` are every measurement
  behind the table, for the count of quiet windows."""
  m = machine(_packages(args))
  windows = sum(len(r.rates) for r in rows)
  quiet = sum(len(r.kept) for r in rows)
  if not windows:
    state = "Nothing was measured (see the notes)."
  elif quiet == windows:
    state = "The machine was quiet: every window was kept."
  else:
    busy_cores = statistics.median(o for r in rows for o in r.others)
    state = (f"**The machine was not quiet**: {windows - quiet} of {windows} windows had other "
             f"processes using >= {args.quiet_cores} cores (median {busy_cores:.2f} cores over "
             f"all windows) and were discarded; rows marked busy had no quiet window and show "
             f"the median of all their windows, a lower bound to re-run on a quiet machine.")
  lines = [
      f"## {title}: {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}", "",
      f"`{command}`", "",
      f"- Machine: {m['cpu']}", f"- Versions: {m['versions']}",
      f"- XLA_FLAGS: `{m['xla_flags']}`; GLIBC_TUNABLES: `{m['glibc_tunables']}`",
      f"- cnnjax kernels: {m['kernels']}",
      f"- Method: median images/s over {args.windows} windows of {args.window_seconds:g} s "
      f"after {args.warmup_seconds:g} s of warm-up; a window is kept when other processes "
      f"used < {args.quiet_cores:g} cores during it (from /proc).",
      f"- {state}", "", *table, "", *(f"- {n}" for n in notes), "", ""]
  return "\n".join(lines)


def _batch_sizes(text: str) -> list[int]:
  try:
    sizes = [int(v) for v in text.split(",")]
  except ValueError:
    sizes = []
  if not sizes or min(sizes) < 1:
    raise argparse.ArgumentTypeError(f"{text!r}; expected positive integers separated by commas")
  return sizes


def _row_names(text: str) -> list[str]:
  names = text.split(",")
  unknown = [n for n in names if n not in MODEL_ROWS]
  if unknown:
    raise argparse.ArgumentTypeError(f"unknown rows {unknown}; expected some of {list(MODEL_ROWS)}")
  return names


def _model_batches(text: str) -> dict[str, int]:
  """'resnet18_frozen=16,lite0_frozen=16' -> {row: batch size}."""
  batches = {}
  for item in text.split(","):
    name, _, size = item.partition("=")
    if name not in MODEL_ROWS or not size.isdigit() or int(size) < 1:
      raise argparse.ArgumentTypeError(f"{item!r}; expected <row>=<positive batch size> with "
                                       f"row one of {list(MODEL_ROWS)}")
    batches[name] = int(size)
  return batches


def parse_args(argv: list[str]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(prog="python -m experiments.bench", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  mode = parser.add_mutually_exclusive_group(required=True)
  mode.add_argument("--input", action="store_true",
                    help="input pipelines vs the BN CNN train step")
  mode.add_argument("--models", action="store_true",
                    help="train-step throughput of the cnnjax models vs their PyTorch peers")
  mode.add_argument("--convs", action="store_true",
                    help="forward + gradients of the models' convolutions: lax vs cnnjax lowering")
  parser.add_argument("--source", default="../shared/data/cifar10.npz",
                      help="CIFAR-10 data for cnnjax.data.sources.load (.npz, idx folder, TFDS name)")
  parser.add_argument("--folder", default="../shared/data/hymenoptera/train",
                      help="an image folder root/<class>/<image>")
  parser.add_argument("--folder_batch_size", type=int, default=32)
  parser.add_argument("--step_model", default="bn_cnn",
                      help="the model (cnnjax.models.create_model) whose train step the input must outpace")
  parser.add_argument("--batch_sizes", type=_batch_sizes, default=[32, 128],
                      help="CIFAR-10 pipeline and train-step batch sizes, e.g. 32,128")
  parser.add_argument("--workers", type=int, default=2,
                      help="worker processes for the second measurement of each pipeline (0: none)")
  parser.add_argument("--only", type=_row_names, default=list(MODEL_ROWS),
                      help=f"--models rows, comma-separated, of {','.join(MODEL_ROWS)}")
  parser.add_argument("--model_batches", type=_model_batches, default={},
                      help="--models batch sizes other than the defaults, e.g. lite0_frozen=16")
  parser.add_argument("--no_torch", action="store_true",
                      help="--models and --convs without the PyTorch peers")
  parser.add_argument("--windows", type=int, default=7)
  parser.add_argument("--window_seconds", type=float, default=3.0)
  parser.add_argument("--warmup_seconds", type=float, default=3.0)
  parser.add_argument("--quiet_cores", type=float, default=0.1,
                      help="keep a window when other processes used fewer cores than this")
  parser.add_argument("--out", default="BENCHMARKS.md", help="markdown file the results are appended to")
  return parser.parse_args(argv)


def _printed(measured: Iterator[Any], header: list[str],
             format_fn: Callable[[Any], str]) -> list[Any]:
  """The rows of ``measured``, each printed as a table row as soon as it is measured."""
  print("\n".join(header), flush=True)
  rows = []
  for row in measured:
    rows.append(row)
    print(format_fn(row), flush=True)
  return rows


def main(argv: list[str]) -> None:
  """Runs the chosen mode, prints each row as it is measured, appends the report to --out."""
  args = parse_args(argv)
  m = machine(_packages(args))
  print(f"{m['cpu']}; {m['versions']}", flush=True)
  if args.input:
    title = f"Input pipelines vs the {args.step_model} train step"
    rows = measurements = _printed(input_rows(args), INPUT_HEADER, format_row)
    table, notes = INPUT_HEADER + [format_row(r) for r in rows], ratios(rows)
    print("\n".join(notes), flush=True)
  elif args.convs:
    title, failures = "Convolution lowering: lax vs cnnjax.models.conv", []
    rows = _printed(conv_rows(args, failures), CONV_HEADER, format_conv_row)
    measurements = [m for r in rows for m in r.measurements]
    table, notes = CONV_HEADER + [format_conv_row(r) for r in rows], [CONV_NOTE] + failures
  else:
    title, failures = "Train steps: cnnjax (JAX) vs PyTorch", []
    rows = _printed(model_rows(args, failures), MODEL_HEADER, format_model_row)
    measurements = [m for r in rows for m in r.measurements]
    table, notes = MODEL_HEADER + [format_model_row(r) for r in rows], model_notes(rows)
    print("\n".join(notes[1:]), flush=True)  # the first, the method, is in the docstring
    notes += failures
  command = "python -m experiments.bench " + " ".join(argv)
  with open(args.out, "a") as f:
    f.write(report(title, command, measurements, table, notes, args))
  print(f"appended to {args.out}", flush=True)


if __name__ == "__main__":
  try:
    main(sys.argv[1:])
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
