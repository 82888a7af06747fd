r"""Reproduce the course: every study of its notebooks in one command, and the table.

  python -m experiments.course --workdir runs/course [--quick] [--data ../shared/data] \
      [--only simple_cnn,fashion_lenet]

Each study runs the course's own recipe and, where cnnjax has one, its improved recipe, each
in ``WORKDIR/<study>/<recipe>`` (``-quick`` appended with ``--quick``) through the same
``train.train_and_evaluate`` as ``experiments.train``; then ``WORKDIR/course.md`` (and
``course.json``) lists notebook, study, the course's figure, cnnjax's on the course recipe,
cnnjax's improved figure, wall time and the command of each run, under a line naming the
machines, jax versions and dates the runs were measured on. ``--quick``: one to three
epochs on at most 5,000 training images each (minutes in all). ``--data DIR``: local copies
(``cifar10.npz``, ``fashion-mnist/``, ``hymenoptera/``, ``tiny-imagenet-200.zip``) instead of
the configs' downloads. A study whose data or weights cannot be had (offline) is listed as
skipped with the reason. Rerunning continues: finished runs are read back, not retrained;
Ctrl-C stops after writing the table so far.
"""
import dataclasses
import json
import os
import pathlib
import time

from absl import flags

from experiments import entry

FLAGS = entry.command_flags()
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory of the runs and course.md.",
                               flag_values=FLAGS)
_QUICK = flags.DEFINE_bool("quick", False, "Every run shortened to minutes in all.",
                           flag_values=FLAGS)
_DATA = flags.DEFINE_string("data", None, "Folder of local copies of the datasets "
                            "(cifar10.npz, fashion-mnist/, hymenoptera/, tiny-imagenet-200.zip).",
                            flag_values=FLAGS)
_ONLY = flags.DEFINE_list("only", [], "Run only these studies (names as in course.md).",
                          flag_values=FLAGS)

# A config's data.source -> the names a local copy has in --data.
LOCAL_NAMES = {"cifar10": ("cifar10.npz",), "fashion_mnist": ("fashion-mnist", "fashion_mnist"),
               "data/hymenoptera": ("hymenoptera",),
               "tiny_imagenet": ("tiny-imagenet-200.zip", "tiny-imagenet-200")}
QUICK = {"data.limit": 5000, "num_epochs": 1}
ROOT = pathlib.Path(__file__).resolve().parent.parent


@dataclasses.dataclass(frozen=True)
class Recipe:
  """A config file (``name[:arg]`` in experiments/configs) with overrides."""
  config: str
  overrides: tuple[tuple[str, object], ...] = ()
  quick: tuple[tuple[str, object], ...] = ()  # replaces QUICK's keys in --quick

  @property
  def path(self) -> str:
    """``experiments/configs/<name>.py[:arg]``, relative to the checkout."""
    name, colon, arg = self.config.partition(":")
    return f"experiments/configs/{name}.py{colon}{arg}"

  def command(self, workdir: str) -> str:
    overrides = "".join(f" --config.{k}={v}" for k, v in self.overrides)
    return f"python -m experiments.train --config {self.path} --workdir {workdir}{overrides}"


@dataclasses.dataclass(frozen=True)
class Study:
  notebook: str
  name: str
  title: str
  course_figure: str  # what the notebook reports ('-': none)
  course: Recipe | None  # the notebook's recipe, None where the study is cnnjax's own
  improved: Recipe | None = None


CONSTANT = (("schedule.name", "constant"),)
STUDIES = (
    Study("PyTorch CIFAR-10", "cifar_seed", "SeedCNN (the first CNN)", "-", Recipe("cifar_seed")),
    Study("PyTorch CIFAR-10", "simple_cnn", "SimpleCNN", "61.9% val, 61.2% test",
          Recipe("cifar_simple"), Recipe("cifar_simple", (("schedule.name", "one_cycle"),
                                                          ("eval_flip", True)))),
    Study("PyTorch CIFAR-10", "custom_cnn", "CustomCNN (batch norm, 8 convs)", "83.0% test",
          Recipe("cifar_bn", CONSTANT + (("eval_flip", False),)), Recipe("cifar_bn")),
    Study("PyTorch CIFAR-10", "custom_cnn_fast", "CustomCNN, time to accuracy",
          "83.0% (the course recipe's time: see custom_cnn)", None, Recipe("cifar_bn_fast")),
    Study("Fashion-MNIST", "fashion_lenet", "LeNet (no padding), rotated test", "-",
          Recipe("fashion_lenet"), Recipe("lenet", (("data.source", "fashion_mnist"),))),
    Study("Fashion-MNIST", "fashion_competition", "the competition",
          "benchmark: small CNNs 87.6-93.9%, ResNet-18 94.9%", None,
          Recipe("fashion_fast")),
    Study("MNIST LeNet-5", "lenet", "LeNet-5, 1998 and modern", ">= 99.0% (modern)",
          Recipe("lenet_1998", quick=(("data.limit", 20000),)),  # sigmoids start slowly
          Recipe("lenet")),
    Study("Keras", "keras_mlp", "dense network on MNIST", ">= 97.5%", Recipe("mlp", CONSTANT),
          Recipe("mlp")),
    Study("Keras", "keras_convnet", "MNIST convnet", ">= 99.0%", Recipe("keras_convnet", CONSTANT),
          Recipe("keras_convnet")),
    Study("Keras", "keras_cats_dogs", "cats vs dogs from scratch (ants vs bees here), augmented",
          "~71% without augmentation, ~82% with (2,000 cats/dogs)",
          Recipe("keras_cats_dogs", quick=(("num_epochs", 3),)),
          Recipe("hymenoptera:efficientnet_lite0,features", quick=(("num_epochs", 3),))),
    Study("Keras", "keras_augment", "ImageDataGenerator set on CIFAR-10 (BNCNN)", "-",
          None, Recipe("keras_augment")),
    Study("PyTorch transfer learning", "hymenoptera", "ants vs bees from ImageNet weights", "-",
          Recipe("hymenoptera:efficientnet_lite0,frozen"),
          Recipe("hymenoptera:efficientnet_lite0,finetune")),
    Study("R torch (luz)", "tiny_imagenet", "Tiny ImageNet: the book's CNN, ResNet-18", "-",
          Recipe("tiny_imagenet_cnn"), Recipe("tiny_imagenet_resnet18")),
)


def _local_source(source: str, data: str | None) -> str:
  for name in LOCAL_NAMES.get(source, ()) if data else ():
    if (path := pathlib.Path(data) / name).exists():
      return str(path)
  return source


def _figure(metrics: dict, workdir: pathlib.Path) -> str:
  """Test accuracy (``84.3%``) and, where the run has them, the lossless and rotated test
  accuracies and the last epoch's validation accuracy."""
  parts = [f"{100 * metrics['accuracy']:.1f}%"]
  if "accuracy_lossless" in metrics:
    parts = [f"{100 * metrics['accuracy_lossless']:.1f}% lossless 1k, {parts[0]} on "
             f"{metrics['count']:,}"]
  if "accuracy_rotated" in metrics:
    parts.append(f"{100 * metrics['accuracy_rotated']:.1f}% rotated")
  rows = (workdir / "metrics.jsonl").read_text().splitlines()
  if rows and "val_accuracy" in (last := json.loads(rows[-1])):
    parts.append(f"val {100 * last['val_accuracy']:.1f}%")
  return ", ".join(parts)


def run_recipe(recipe: Recipe, workdir: pathlib.Path, quick: bool, data: str | None,
               previous: dict) -> dict:
  """Runs (or reads back) one recipe; a row of course.json."""
  from cnnjax import train
  from cnnjax.errors import UserError
  config = entry.load_config_file(str(ROOT / recipe.path))
  overrides = dict(recipe.overrides)
  if quick:
    overrides.update({**QUICK, **dict(recipe.quick)})
  for key, value in overrides.items():
    entry.apply_override(config, key, str(value))
  if quick and config.data.val_size >= 1:  # a count (cifar_bn's 10,000): a fifth of the limit
    overrides["data.val_size"] = QUICK["data.limit"] // 5
    entry.apply_override(config, "data.val_size", str(overrides["data.val_size"]))
  source = _local_source(config.data.source, data)
  if source != config.data.source:
    config.data.source = source
    overrides["data.source"] = source
  row = {"config": recipe.config, "workdir": str(workdir),
         "command": Recipe(recipe.config, tuple(overrides.items())).command(str(workdir))}
  finished = (workdir / "test_metrics.json").is_file()
  start = time.monotonic()
  try:
    metrics = train.train_and_evaluate(config, str(workdir))
  except UserError as e:
    return {**row, "skipped": str(e).splitlines()[0]}
  if metrics.get("interrupted"):
    raise KeyboardInterrupt
  wall = previous.get("wall_s") if finished else round(time.monotonic() - start, 1)
  return {**row, "figure": _figure(metrics, workdir), "accuracy": metrics["accuracy"], "wall_s": wall,
          "measured": _measured(workdir)}


def _measured(workdir: pathlib.Path) -> str:
  """Where and when a finished run was measured: ``AMD EPYC, 2 cores, jax 0.10.2, 2026-12-04``
  (its run_info.json; the date its test report was written)."""
  info = json.loads((workdir / "run_info.json").read_text())
  day = time.strftime("%Y-%m-%d", time.localtime((workdir / "test_metrics.json").stat().st_mtime))
  return f"{info['cpu']}, {info['cpu_count']} cores, jax {info['packages']['jax']}, {day}"


def _cell(row: dict | None) -> str:
  if row is None:
    return "-"
  return "skipped (below)" if "skipped" in row else row["figure"]


def _wall(rows: list[dict | None]) -> str:
  times = [r["wall_s"] for r in rows if r and r.get("wall_s") is not None]
  return " + ".join(f"{t / 60:.1f} min" if t >= 120 else f"{t:.0f} s" for t in times) or "-"


def table(results: list[dict], quick: bool) -> str:
  """course.md: one row per study, then the commands."""
  measured = sorted({r[k]["measured"] for r in results for k in ("course", "improved")
                     if r[k] and "measured" in r[k]})
  lines = [f"# The course, reproduced{' (quick: shortened runs)' if quick else ''}", "",
           f"Measured on {'; '.join(measured) or '-'}.", "",
           "| notebook | study | the course | cnnjax, course recipe | cnnjax, improved | wall |",
           "|---|---|---|---|---|---|"]
  for r in results:
    lines.append(f"| {r['notebook']} | `{r['name']}`: {r['title']} | {r['course_figure']} | "
                 f"{_cell(r['course'])} | {_cell(r['improved'])} | "
                 f"{_wall([r['course'], r['improved']])} |")
  skipped = {f"- `{r['name']}`: {r[k]['skipped']}" for r in results for k in ("course", "improved")
             if r[k] and "skipped" in r[k]}
  if skipped:
    lines += ["", "Skipped:", "", *sorted(skipped)]
  lines += ["", "Commands:", ""]
  for r in results:
    for kind in ("course", "improved"):
      if r[kind]:
        lines.append(f"- `{r['name']}` {kind}: `{r[kind]['command']}`")
  return "\n".join(lines) + "\n"


def _write(path: pathlib.Path, text: str) -> None:
  """Replaces ``path`` whole (a crash leaves the previous table, never half of one)."""
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(text)
  os.replace(tmp, path)


def main() -> int:
  from cnnjax.errors import UserError
  workdir = pathlib.Path(_WORKDIR.value)
  names = {s.name for s in STUDIES}
  if unknown := sorted(set(_ONLY.value) - names):
    raise UserError(f"--only: unknown studies {unknown}; expected some of {sorted(names)}")
  studies = [s for s in STUDIES if not _ONLY.value or s.name in _ONLY.value]
  workdir.mkdir(parents=True, exist_ok=True)
  json_path = workdir / "course.json"
  try:
    previous = {r["name"]: r for r in json.loads(json_path.read_text())["studies"]}
  except (OSError, ValueError, KeyError):
    previous = {}
  results, suffix, status = [], "-quick" if _QUICK.value else "", 0
  try:
    for study in studies:
      result = {f: getattr(study, f) for f in ("notebook", "name", "title", "course_figure")}
      for kind in ("course", "improved"):
        recipe = getattr(study, kind)
        before = (previous.get(study.name) or {}).get(kind) or {}
        result[kind] = recipe and run_recipe(recipe, workdir / study.name / f"{kind}{suffix}",
                                             _QUICK.value, _DATA.value, before)
        shown = result[kind] and result[kind].get("skipped", result[kind].get("figure"))
        print(f"Course | {study.name} {kind}: {shown or '-'}", flush=True)
      results.append(result)
  except KeyboardInterrupt:
    status = entry.INTERRUPTED
  done = {r["name"] for r in results}
  kept = [previous[s.name] for s in STUDIES if s.name in previous and s.name not in done]
  order = {s.name: i for i, s in enumerate(STUDIES)}
  results = sorted(results + kept, key=lambda r: order.get(r["name"], len(order)))
  _write(json_path, json.dumps({"quick": _QUICK.value, "studies": results}, indent=1) + "\n")
  _write(workdir / "course.md", table(results, _QUICK.value))
  print(f"Course | table in {workdir / 'course.md'}", flush=True)
  return status


def cli(argv: list[str] | None = None) -> None:
  entry.run(main, doc=__doc__, fv=FLAGS, required=["workdir"], argv=argv)


if __name__ == "__main__":
  cli()
