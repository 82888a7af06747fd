r"""Throughput benchmarks of cnnjax on this machine.

  python -m benchmarks --mode=models [--only seed_cnn,lenet,...] [--no_torch]
      [--model_batches lite0_frozen=16,...]
  python -m benchmarks --mode=convs [--no_torch]
  python -m benchmarks --mode=input [--source cifar10.npz] [--folder hymenoptera/train]
      [--batch_sizes 32,128] [--workers 2] [--folder_batch_size 32] [--step_model bn_cnn]
  common: [--windows 7] [--window_seconds 3] [--warmup_seconds 3] [--settle_seconds 0.5]
      [--quiet_cores 0.1] [--out BENCHMARKS.md]

models: a train step of each cnnjax model against its PyTorch peer (benchmarks/model_rows.py);
convs: each model convolution under lax, cnnjax's lowering and PyTorch
(benchmarks/conv_rows.py); input: the input pipelines against the train step they feed
(benchmarks/input_rows.py; synthetic data where ``--source``/``--folder`` are omitted). How
windows are timed and kept on a shared machine: benchmarks/harness.py.

Rows are printed on stderr as they are measured; the markdown report (command, machine,
versions, date, method, table, notes) is printed on stdout, and appended to ``--out`` when
given. Bad flags or input end with one ``error:`` line and exit status 2.
"""
import importlib.util
import shlex
import sys
from typing import Any, Callable, Iterator

from absl import flags

from benchmarks import conv_rows, harness, input_rows, model_rows, roofline
from cnnjax import runtime
from cnnjax.errors import UserError
from cnnjax.models import MODELS
from experiments import entry

MODES = ("models", "convs", "input")


class _ListParser(flags.ArgumentParser):
  """Comma-separated items, each converted by ``item`` (a ValueError names a bad one)."""

  def __init__(self, item: Callable[[str], Any], syntactic_help: str):
    self._item = item
    self.syntactic_help = syntactic_help

  def parse(self, argument: str | list[Any]) -> list[Any]:
    if isinstance(argument, list):
      return argument
    return [self._item(v) for v in argument.split(",")]

  def flag_type(self) -> str:
    return "list"


def _positive(text: str) -> int:
  if not text.isdigit() or int(text) < 1:
    raise ValueError(f"{text!r}; expected positive integers separated by commas")
  return int(text)


def _row(text: str) -> str:
  if text not in model_rows.MODEL_ROWS:
    raise ValueError(f"unknown row {text!r}; expected some of {list(model_rows.MODEL_ROWS)}")
  return text


def _row_batch(text: str) -> tuple[str, int]:
  """'lite0_frozen=16' -> ('lite0_frozen', 16)."""
  name, _, size = text.partition("=")
  if name not in model_rows.MODEL_ROWS or not size.isdigit() or int(size) < 1:
    raise ValueError(f"{text!r}; expected <row>=<positive batch size> with row one of "
                     f"{list(model_rows.MODEL_ROWS)}")
  return name, int(size)


def _flag_values() -> flags.FlagValues:
  """This command's flags, private (not absl's global ``FLAGS``): one fresh set per run."""
  fv = flags.FlagValues()
  define = {"flag_values": fv}
  flags.DEFINE_bool("help", False, "show this help and exit", **define)
  flags.DEFINE_enum("mode", None, MODES, "what to measure (see above)", **define)
  flags.DEFINE_string("out", None, "markdown file the report is appended to (e.g. "
                      "BENCHMARKS.md); without it the report is only printed", **define)
  flags.DEFINE_integer("windows", 7, "timed windows per measurement", lower_bound=1, **define)
  flags.DEFINE_float("window_seconds", 3.0, "length of each window (> 0)", **define)
  flags.register_validator("window_seconds", lambda v: v > 0, "expected > 0 seconds",
                           flag_values=fv)
  flags.DEFINE_float("warmup_seconds", 3.0, "untimed work before the windows", lower_bound=0,
                     **define)
  flags.DEFINE_float("settle_seconds", 0.5, "untimed work before each window of a row whose "
                     "variants take turns", lower_bound=0, **define)
  flags.DEFINE_float("quiet_cores", 0.1, "keep a window when other processes used fewer "
                     "cores than this", lower_bound=0, **define)
  # --mode=models and --mode=convs
  flags.DEFINE_bool("no_torch", False, "models and convs without the PyTorch peers", **define)
  flags.DEFINE(_ListParser(_row, "rows separated by commas"), "only", None,
               f"models rows, comma-separated, of {','.join(model_rows.MODEL_ROWS)} "
               "(default: all)", serializer=flags.ListSerializer(","), **define)
  flags.DEFINE(_ListParser(_row_batch, "<row>=<batch size> items separated by commas"),
               "model_batches", None, "models batch sizes other than the defaults, e.g. "
               "lite0_frozen=16", **define)
  # --mode=input
  flags.DEFINE_string("source", None, "CIFAR-10 data for cnnjax.data.sources.load (.npz, "
                      "idx folder, TFDS name); default: synthetic uint8 noise", **define)
  flags.DEFINE_string("folder", None, "an image folder root/<class>/<image>; default: "
                      "generated JPEGs in a temporary directory", **define)
  flags.DEFINE_integer("folder_batch_size", 32, "batch size of the folder pipeline",
                       lower_bound=1, **define)
  flags.DEFINE_enum("step_model", "bn_cnn", [m for m in MODELS if m != "transfer"],
                    "the model whose train step the input must outpace", **define)
  flags.DEFINE(_ListParser(_positive, "positive integers separated by commas"),
               "batch_sizes", "32,128", "CIFAR-10 pipeline and train-step batch sizes",
               serializer=flags.ListSerializer(","), **define)
  flags.DEFINE_integer("workers", 2, "worker processes for the second measurement of each "
                       "pipeline (0: none)", lower_bound=0, **define)
  return fv


def _parse(argv: list[str]) -> flags.FlagValues:
  """The flags of ``argv`` (program name first); a bad one raises ``UserError``."""
  fv = _flag_values()
  try:
    extra = fv(argv)[1:]
  except flags.Error as e:
    raise UserError(str(e)) from None
  if extra:
    raise UserError(f"unexpected arguments {extra}; expected only --flags")
  if fv.mode is None and not fv.help:
    raise UserError(f"--mode is required; expected one of {', '.join(MODES)} (--help lists "
                    f"the flags)")
  return fv


def _with_torch(notes: list[str]) -> bool:
  """Whether torch and torchvision are installed for the peers (a note says why not)."""
  missing = [name for name in ("torch", "torchvision") if importlib.util.find_spec(name) is None]
  if missing:
    harness.note(notes, f"PyTorch peers not run ({', '.join(missing)} not installed): cnnjax "
                 "figures only")
  return not missing


def _printed(measured: Iterator[Any], header: list[str],
             format_fn: Callable[[Any], str]) -> tuple[list[Any], list[str]]:
  """``(rows, table)``: the rows of ``measured``, each printed as a table row as soon as it
  is measured, and the markdown table (``header`` and rows)."""
  harness.progress("\n".join(header))
  rows, table = [], list(header)
  for row in measured:
    rows.append(row)
    table.append(format_fn(row))
    harness.progress(table[-1])
  return rows, table


def run(fv: flags.FlagValues, command: str) -> str:
  """Measures the mode of the parsed flags ``fv``; returns the report of ``command``."""
  windows = harness.Windows(fv.windows, fv.window_seconds, fv.warmup_seconds, fv.quiet_cores,
                            fv.settle_seconds)
  notes = []
  with_torch = fv.mode != "input" and not fv.no_torch and _with_torch(notes)
  m = harness.machine(with_torch)
  harness.progress(f"{m['machine']}\n{m['versions']}")
  if fv.mode == "input":
    title = f"Input pipelines vs the {fv.step_model} train step"
    with input_rows.input_data(fv.source, fv.folder) as data:
      harness.progress(data.description)
      rows, table = _printed(
          input_rows.input_rows(data, fv.batch_sizes, fv.workers, fv.folder_batch_size,
                                fv.step_model, windows),
          input_rows.INPUT_HEADER, input_rows.format_row)
    measurements, notes = rows, [data.description, *input_rows.ratios(rows, data)]
  elif fv.mode == "convs":
    title = "Convolution lowering: lax vs cnnjax.models.conv"
    rows, table = _printed(conv_rows.conv_rows(with_torch, windows, notes), conv_rows.CONV_HEADER,
                           conv_rows.format_conv_row)
    measurements, notes = [x for r in rows for x in r.measurements], [conv_rows.CONV_NOTE, *notes]
  else:
    title = "Train steps: cnnjax (JAX) vs PyTorch"
    rows, table = _printed(
        model_rows.model_rows(fv.only or list(model_rows.MODEL_ROWS), dict(fv.model_batches or ()),
                              with_torch, windows, notes),
        model_rows.MODEL_HEADER, model_rows.format_model_row)
    measurements = [x for r in rows for x in r.measurements]
    peaks = {dtype: roofline.peak_tflops(dtype) for dtype in ("float32", "bfloat16")}
    notes = [model_rows.MODEL_NOTE, *model_rows.torch_figures(rows),
             *model_rows.arithmetic(rows, peaks), *notes]
  return harness.report(title, command, measurements, table, notes, windows, with_torch)


def main(argv: list[str]) -> None:
  """Parses ``argv`` (program name first), measures, prints the report and appends it to
  ``--out``; bad input ends with one ``error:`` line and exit status 2."""
  entry.prepare_process()  # the commands' XLA flags and malloc tunables (a restart), first
  try:
    fv = _parse(argv)
    if fv.help:
      print(__doc__ + "\n" + fv.get_help(include_special_flags=False))
      return
    runtime.configure()
    text = run(fv, shlex.join(["python", "-m", "benchmarks", *argv[1:]]))
  except UserError as e:
    entry.fail(str(e))
  print(text, end="", flush=True)
  if fv.out:
    with open(fv.out, "a") as f:
      f.write(text)
    harness.progress(f"appended to {fv.out}")


if __name__ == "__main__":
  main(sys.argv)
