r"""``--mode=models``: images/s of a train step of each cnnjax model against the same
architecture in PyTorch, in one run.

  python -m benchmarks --mode=models [--only seed_cnn,lenet,...] [--no_torch]
      [--model_batches lite0_frozen=16,...] [--windows 7] [--window_seconds 3] [--out FILE]

Rows (``MODEL_ROWS``): SeedCNN (batch 128, 32x32x3), LeNet (64, 28x28x1), BNCNN (128,
32x32x3), ResNet-18 with the CIFAR stem (128, 32x32x3), and at 224x224 (batch 32) ResNet-18
and EfficientNet-Lite0 with a frozen base (the 'frozen' workflow of
experiments/configs/transfer_base.py: only the new head trains) and as feature extractors
(the backbone's inference alone); 10 classes, one synthetic uint8 batch reused, normalised
inside the step on both sides. The JAX figure is the step a training runs
(``cnnjax.steps.Runner``: jit, donated state, Adam, dropout rng, batch norm in train mode,
the frozen base frozen by the ``optimizer.groups`` rules and run in inference mode), one
step in flight; its first call (trace + compile + one step) is reported apart as the
compile time; where this machine computes bfloat16 (``cnnjax.runtime.compute_dtype``) the
same step runs again with ``precision='bfloat16'`` (bf16 compute, float32 parameters,
optimizer and loss). The PyTorch peers (``benchmarks.torch_peers``, where torch is
installed) run in a process of their own per row (``harness.Peer``: without JAX, and
without cnnjax's malloc tunables), eagerly on ``os.cpu_count()`` threads with Adam in
``model.train()`` (a frozen base in ``eval()`` without gradients; a feature extractor in
``eval()`` under ``torch.inference_mode()``), in float32 NCHW, float32 channels_last and bf16 autocast
channels_last. Every variant of a row, JAX's and PyTorch's, takes its windows in turn
(``harness.timed``). The table shows the faster float32 layout, bf16, and JAX's ratios:
float32 to float32, bf16 to bf16 autocast.
The parameter counts of both sides must agree (they are in the table); a row that cannot
be built or measured is left out with a note saying why.
"""
import dataclasses
from typing import Any, Callable, Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks import harness, roofline
from benchmarks.harness import Measurement, Windows
from cnnjax import optim, runtime, steps
from cnnjax import config as config_lib
from cnnjax.models import create_model, model_from_config
from experiments.configs import transfer_base

NUM_CLASSES = 10  # of the synthetic labels, every model and head


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """One ``--mode=models`` row.

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
  """A ``--mode=models`` row: the cnnjax step and its PyTorch peers on the same architecture.

  Attributes:
    spec: what was measured.
    batch_size: images per step.
    params: parameters of the model (of the backbone for a 'features' row), the same in both.
    jax: the cnnjax step (float32).
    compile_seconds: its first call: trace, compile and one step.
    torch: torch variant (``torch_peers.VARIANTS``) -> its measurement; empty without torch.
    jax_bf16: the cnnjax step in bfloat16 (None where this machine has no bf16).
    gflops: GFLOP per trained image (``roofline.train_gflops``) of a 'train' row, else None.
  """
  spec: ModelSpec
  batch_size: int
  params: int
  jax: Measurement
  compile_seconds: float
  torch: dict[str, Measurement]
  jax_bf16: Measurement | None = None
  gflops: float | None = None

  @property
  def measurements(self) -> list[Measurement]:
    return [self.jax, *([self.jax_bf16] if self.jax_bf16 else []), *self.torch.values()]

  def best_f32(self) -> tuple[str, Measurement] | None:
    """The faster float32 torch variant and its measurement."""
    f32 = [(v, m) for v, m in self.torch.items() if v != BF16]
    return max(f32, key=lambda vm: vm[1].images_per_second) if f32 else None


def _count(params: Any) -> int:
  return sum(int(np.size(leaf)) for leaf in jax.tree.leaves(params))


def synthetic_batch(batch_size: int, image_shape: tuple[int, ...]) -> dict[str, np.ndarray]:
  """uint8 images ``[B, H, W, C]`` and labels ``[B]`` in ``[0, NUM_CLASSES)``."""
  rng = np.random.default_rng(0)
  return {"image": rng.integers(0, 256, (batch_size, *image_shape), np.uint8),
          "label": rng.integers(0, NUM_CLASSES, batch_size)}


def _normalize(channels: int) -> Callable[[jax.Array], jax.Array]:
  return steps.make_normalize(np.full(channels, 127.0), np.full(channels, 64.0))


def train_dispatch(model: nn.Module, groups: tuple[str, ...], batch: dict[str, np.ndarray],
                   dtype: str = "float32") -> tuple[Callable[[], Any], int]:
  """``(dispatch, parameters)``: ``cnnjax.steps.Runner``'s train step (jit, donated state,
  Adam at the config defaults, dropout rng, batch norm in train mode, computing in
  ``dtype``) of ``model`` on ``batch``; the modules the ``optimizer.groups`` rules ``groups``
  freeze get no updates and run in inference mode, as a training arranges. ``dispatch``
  runs one step."""
  cfg = config_lib.default_optimizer_config()
  cfg.groups = groups
  tx = optim.make_optimizer(cfg, optax.constant_schedule(cfg.lr))
  state = steps.create_train_state(model, tx, batch["image"].shape[1:], seed=0)
  runner = steps.Runner.create(_normalize(batch["image"].shape[-1]),
                               frozen=optim.frozen_modules(state.params, groups), dtype=dtype)
  held = {"state": runner.put_state(state)}
  batch = runner.to_global(batch)

  def dispatch() -> dict[str, jax.Array]:
    held["state"], sums = runner.train_step(held["state"], batch)
    return sums
  return dispatch, _count(state.params)


def _features_dispatch(backbone: nn.Module, batch: dict[str, np.ndarray],
                       dtype: str = "float32") -> tuple[Callable[[], Any], int]:
  """``(dispatch, parameters)``: the backbone in inference mode on ``batch``'s images, as
  ``cnnjax.transfer.extract_features`` runs it (computing in ``dtype``); ``dispatch``
  returns features ``[B, D]``."""
  images = jnp.asarray(batch["image"])
  dummy = jnp.zeros((1, *images.shape[1:]), jnp.float32)
  variables = jax.jit(lambda: backbone.init(jax.random.PRNGKey(0), dummy, train=False))()
  normalize = _normalize(images.shape[-1])
  apply = jax.jit(lambda v, x: steps.apply_in(dtype, backbone.apply, v, normalize(x), train=False))
  return lambda: apply(variables, images), _count(variables["params"])


def _jax_model(spec: ModelSpec) -> tuple[nn.Module, tuple[str, ...]]:
  """The model a training of ``spec`` builds and its ``optimizer.groups``; a 'frozen' or
  'features' row takes both from transfer_base's workflow of that name (a 'transfer' model)."""
  if spec.kind == "train":
    return create_model(spec.model, num_classes=NUM_CLASSES, **spec.options), ()
  c = transfer_base.transfer_config(spec.model, spec.kind)
  c.model.num_classes = NUM_CLASSES
  return model_from_config(c.model), tuple(c.optimizer.groups)


def _model_row(name: str, batch_size: int, with_torch: bool, windows: Windows,
               notes: list[str]) -> ModelRow:
  """Measures the cnnjax step of row ``name`` (float32, and bf16 where this machine has it)
  and, ``with_torch``, each torch variant of its peer in a process of their own, all in
  turn (``harness.timed_against_peer``: the parameter counts must agree; a peer that fails
  leaves the row's torch cells empty, with a note). Both JAX steps and the peer's models
  are alive together."""
  spec = MODEL_ROWS[name]
  batch = synthetic_batch(batch_size, spec.image_shape)
  model, groups = _jax_model(spec)

  def jax_dispatch(dtype: str) -> tuple[Callable[[], Any], int]:
    if spec.kind == "features":
      return _features_dispatch(model.backbone_model(), batch, dtype)
    return train_dispatch(model, groups, batch, dtype)
  dispatch, params = jax_dispatch("float32")
  sides = {}
  sides["JAX"], compile_seconds = harness.jax_side(dispatch, batch_size)
  if runtime.compute_dtype("bfloat16")[0] == "bfloat16":
    sides["JAX bf16"], _ = harness.jax_side(jax_dispatch("bfloat16")[0], batch_size)
  request = {"row": name, "kind": spec.kind, "model": spec.model,
             "image_shape": spec.image_shape, "batch_size": batch_size,
             "num_classes": NUM_CLASSES, "dropout": getattr(model, "dropout_rate", 0.0)}
  measured = harness.timed_against_peer(sides, request if with_torch else None, batch_size,
                                        windows, spec.title, notes, params)
  torch_rows = {side.removeprefix("torch "): m for side, m in measured.items()
                if side.startswith("torch ")}
  gflops = roofline.train_gflops(model, spec.image_shape) if spec.kind == "train" else None
  return ModelRow(spec, batch_size, params, measured["JAX"], compile_seconds, torch_rows,
                  measured.get("JAX bf16"), gflops)


def model_rows(names: list[str], batches: dict[str, int], with_torch: bool,
               windows: Windows, notes: list[str]) -> Iterator[ModelRow]:
  """The rows ``names`` (keys of MODEL_ROWS; ``batches``: row -> batch size other than its
  default), one after the other; a row that fails is left out with a note saying why."""
  for name in names:
    try:
      yield _model_row(name, batches.get(name, MODEL_ROWS[name].batch_size), with_torch, windows,
                       notes)
    except Exception as e:  # noqa: BLE001  (one row's failure must not stop the others)
      message = (str(e).strip().splitlines() or [""])[0][:300]
      harness.note(notes, f"{name}: not measured ({type(e).__name__}: {message})")


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
    "| model | batch | params | JAX f32 img/s | JAX compile (s) | torch f32 img/s (layout) "
    "| JAX / torch f32 | JAX bf16 img/s | torch bf16 img/s | JAX bf16 / torch bf16 "
    "| windows kept |",
    "|---|---|---|---|---|---|---|---|---|---|---|"]


def format_model_row(r: ModelRow) -> str:
  """A markdown table row of ``r``: figures with no quiet window are marked busy."""
  best = r.best_f32()
  f32 = "-" if best is None else _figure(best[1], best[0].split()[1])
  bf16 = r.torch.get(BF16)
  return (f"| {r.spec.title} | {r.batch_size} | {r.params:,} | {_figure(r.jax)} | "
          f"{r.compile_seconds:.1f} | {f32} | {_ratio(r.jax, best[1] if best else None)} | "
          f"{_figure(r.jax_bf16)} | {_figure(bf16)} | "
          f"{_ratio(r.jax_bf16, bf16) if r.jax_bf16 else '-'} | "
          f"{harness.windows_kept(r.measurements)} |")


MODEL_NOTE = ("JAX: the cnnjax train step (`cnnjax.steps.Runner`: jit, donated state, Adam, "
              "dropout rng, batch norm in train mode; a frozen base frozen by the 'frozen' "
              "workflow's `optimizer.groups`) or, for a feature extractor, the backbone's "
              "jitted inference, on one synthetic uint8 batch normalised in the step; compile "
              "= its first call (trace + compile + one step), before the warm-up. PyTorch "
              "(benchmarks/torch_peers.py): the same architecture and parameter count, in a "
              "process of its own per row (no JAX, glibc's default malloc settings), its "
              "windows taken in turn with JAX's, eager, "
              "`torch.set_num_threads(os.cpu_count())`, Adam, `model.train()`, backward, "
              "step; a frozen base in eval mode without gradients; a feature extractor in "
              "eval mode under `torch.inference_mode()`.")


def arithmetic(rows: list[ModelRow], peaks: dict[str, float | None]) -> list[str]:
  """The machine's peak (``peaks``: 'float32'/'bfloat16' -> TFLOP/s or None) and, per 'train'
  row, the TFLOP/s each step sustained and its share of that peak."""
  measured = ", ".join(f"{dtype} {peak:.3f} TFLOP/s" for dtype, peak in peaks.items() if peak)
  lines = ["Arithmetic (benchmarks/roofline.py): peak of a 4096x1024x1024 product through "
           f"cnnjax.onednn, best of 7: {measured or 'none (the steps do not run oneDNN here)'}"]
  for r in rows:
    if r.gflops is None:
      continue
    best = r.best_f32()
    figures = [("JAX f32", r.jax, "float32"), ("torch f32", best and best[1], "float32"),
               ("JAX bf16", r.jax_bf16, "bfloat16"), ("torch bf16", r.torch.get(BF16), "bfloat16")]
    lines.append(f"{r.spec.title}: {r.gflops:.4g} GFLOP per trained image (XLA's count); " +
                 ", ".join(f"{name} " + roofline.percent(
                     m.images_per_second * r.gflops / 1e3, peaks.get(dtype))
                           for name, m, dtype in figures if m is not None))
  return lines


def torch_figures(rows: list[ModelRow]) -> list[str]:
  """Every torch variant's figure, one line per row measured with torch."""
  return [f"{r.spec.title}: torch img/s " + ", ".join(f"{v} {_figure(m)}"
                                                      for v, m in r.torch.items())
          for r in rows if r.torch]
