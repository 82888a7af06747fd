"""Smoke tests of ``python -m benchmarks --mode=input`` (generated and synthetic data),
``--mode=models`` (small models) and ``--mode=convs`` (tiny shapes), with tiny windows; the
PyTorch comparisons are slow and skip without torch."""
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from benchmarks import __main__ as bench
import flax.linen as nn

from benchmarks import conv_rows, harness, model_rows, roofline
from cnnjax import onednn, runtime

TINY = ["--windows", "1", "--window_seconds", "0.05", "--warmup_seconds", "0",
        "--settle_seconds", "0"]


def _run(args: list[str], capsys) -> str:
  """The report ``python -m benchmarks args`` prints on stdout."""
  bench.main(["benchmarks", *args])
  return capsys.readouterr().out


def _table_rows(text: str) -> list[str]:
  """The markdown table rows of ``text`` after the header."""
  return [line for line in text.splitlines() if line.startswith("| ") and "---" not in line][1:]


def test_input_mode_prints_the_report_and_appends_it_to_out(tmp_path, npz_path, capsys):
  rng = np.random.default_rng(0)
  for c in ("a", "b"):
    (tmp_path / "folder" / c).mkdir(parents=True)
    for i in range(3):
      Image.fromarray(rng.integers(0, 256, (40, 30, 3), np.uint8)).save(
          tmp_path / "folder" / c / f"{i}.png")
  out = tmp_path / "BENCH.md"
  out.write_text("# Benchmarks\n\n")
  text = _run(["--mode=input", "--source", str(npz_path), "--folder", str(tmp_path / "folder"),
               "--step_model", "mlp", "--batch_sizes", "8", "--folder_batch_size", "2",
               "--workers", "0", "--windows", "2", "--window_seconds", "0.01",
               "--warmup_seconds", "0", "--out", str(out)], capsys)
  assert text.startswith("## Input pipelines vs the mlp train step: ")
  assert out.read_text() == "# Benchmarks\n\n" + text
  assert "`python -m benchmarks --mode=input --source " in text
  rows = _table_rows(text)
  assert len(rows) == 4  # crop + flip, Keras set, folder, train step
  assert rows[0].startswith("| CIFAR-10 crop + flip | 8 | in-process | ")
  assert rows[1].startswith("| CIFAR-10 Keras set | 8 | in-process | ")
  assert "/folder decode + resized crop 224 + flip | 2 | in-process | " in rows[2]
  assert rows[3].startswith("| mlp train step (synthetic) | 8 | - | ")
  assert f"- Data: CIFAR-10, 192 images, --source={npz_path}; " in text
  assert "- batch 8: CIFAR-10 crop + flip pipeline / mlp train step (synthetic) = " in text


@pytest.mark.slow
def test_input_mode_without_data_reads_synthetic_data_and_writes_nothing(
    tmp_path, monkeypatch, capsys):
  monkeypatch.chdir(tmp_path)
  text = _run(["--mode=input", "--step_model", "mlp", "--batch_sizes", "8,16", "--workers", "0",
               "--folder_batch_size", "4", *TINY], capsys)
  names = [row.split(" | ")[0][2:] for row in _table_rows(text)]
  assert names == ["synthetic CIFAR-10 crop + flip"] * 2 + [
      "synthetic CIFAR-10 Keras set", "synthetic folder decode + resized crop 224 + flip",
      "mlp train step (synthetic)", "mlp train step (synthetic)"]
  assert ("- Data: synthetic CIFAR-10, 50,000 images, uniform uint8 noise (no --source); "
          "synthetic folder, 64 images, generated 500x375 JPEGs in 2 classes (no --folder).") in text
  assert len(re.findall(r"- batch (8|16): synthetic CIFAR-10 crop \+ flip pipeline / ", text)) == 2
  assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_models_mode_without_torch_reports_a_failed_row_and_measures_the_others(
    monkeypatch, capsys):
  monkeypatch.setitem(model_rows.MODEL_ROWS, "broken",
                      model_rows.ModelSpec("Broken", "train", "no_such_model", (8, 8, 3), 2))
  bench.main(["benchmarks", "--mode=models", "--no_torch", "--only", "broken,lenet",
              "--model_batches", "lenet=8", *TINY])
  text, progress = capsys.readouterr()
  assert "broken: not measured" in progress  # printed as it happened
  assert text.startswith("## Train steps: cnnjax (JAX) vs PyTorch: ")
  assert "torch" not in text.split("- Versions: ")[1].splitlines()[0]
  kernels = text.split("- cnnjax kernels: ")[1].splitlines()[0]
  assert kernels.startswith("oneDNN" if onednn.available() else "XLA's (oneDNN unavailable: ")
  (row,) = _table_rows(text)
  assert row.startswith("| LeNet | 8 | 61,706 | ")
  # No torch columns; a bf16 figure where this machine computes bf16 (a second measurement).
  bf16 = runtime.compute_dtype("bfloat16")[0] == "bfloat16"
  jax_bf16 = r"[\d,.]+( \(busy\))?" if bf16 else "-"
  assert re.search(rf" \| - \| - \| {jax_bf16} \| - \| - \| \d/{2 if bf16 else 1} \|$", row), row
  assert "- broken: not measured (UserError: unknown model 'no_such_model'" in text
  assert "- Arithmetic (benchmarks/roofline.py): peak of a 4096x1024x1024 product " in text
  assert re.search(r"^- LeNet: 0\.002287 GFLOP per trained image \(XLA's count\); JAX f32 "
                   r"[\d.]+ TFLOP/s", text, re.M)


@pytest.mark.slow
def test_models_mode_compares_jax_with_torch_peers(capsys):
  pytest.importorskip("torch")
  text = _run(["--mode=models", "--only", "seed_cnn,lenet", "--model_batches",
               "seed_cnn=16,lenet=16", "--windows", "1", "--window_seconds", "0.2",
               "--warmup_seconds", "0"], capsys)
  assert "torch 2." in text.split("- Versions: ")[1].splitlines()[0]
  seed, lenet = _table_rows(text)
  for row, title, params in [(seed, "SeedCNN", "17,962"), (lenet, "LeNet", "61,706")]:
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[:3] == [title, "16", params]  # parameter counts checked equal
    assert re.search(r"\((NCHW|channels_last)", cells[5])
    bf16 = runtime.compute_dtype("bfloat16")[0] == "bfloat16"
    assert all(re.fullmatch(r"\d+\.\d\dx", c) for c in [cells[6], *cells[9:10] * bf16])
    # JAX (f32, and bf16 where this machine has it) + 3 torch variants, 1 window each.
    assert re.fullmatch(rf"\d/{5 if bf16 else 4}", cells[10])
    assert f"- {title}: torch img/s f32 NCHW " in text
    arithmetic = re.search(rf"^- {title}: [\d.]+ GFLOP per trained image .*$", text, re.M)[0]
    assert re.search(r"JAX f32 [\d.]+ TFLOP/s.*, torch f32 [\d.]+ TFLOP/s", arithmetic)
  assert "not measured" not in text


def _peers_run(script: str, monkeypatch) -> None:
  """Peers run ``python -c script FD`` (FD: the answers' pipe) instead of torch_peers."""
  real_popen = subprocess.Popen
  monkeypatch.setattr(harness.subprocess, "Popen", lambda cmd, **kwargs: real_popen(
      [sys.executable, "-c", script, cmd[-1]], **kwargs))


def test_a_failing_torch_peer_is_a_note_and_keeps_the_jax_figures(monkeypatch, capsys):
  monkeypatch.setattr(bench, "_with_torch", lambda notes: True)
  _peers_run("import sys; sys.exit('ImportError: no torch')", monkeypatch)  # no torch there
  text = _run(["--mode=models", "--only", "lenet", "--model_batches", "lenet=8", *TINY], capsys)
  (row,) = _table_rows(text)
  assert row.startswith("| LeNet | 8 | 61,706 | ") and " | - | - | " in row
  assert ("- LeNet: PyTorch peer not measured (the PyTorch peer's process exited with 1: "
          "ImportError: no torch)") in text


@pytest.mark.slow
def test_a_peer_that_dies_during_the_windows_is_a_note_and_keeps_the_jax_figures(
    monkeypatch, capsys):
  pytest.importorskip("torch")
  real_ask, windows = harness.Peer.ask, []

  def dying(peer, message):  # the peer's process killed after its first window
    if "window" in message:
      if windows:
        peer._process.kill()
      windows.append(message)
    return real_ask(peer, message)
  monkeypatch.setattr(harness.Peer, "ask", dying)
  text = _run(["--mode=models", "--only", "lenet", "--model_batches", "lenet=8", "--windows",
               "2", "--window_seconds", "0.05", "--warmup_seconds", "0", "--settle_seconds",
               "0"], capsys)
  (row,) = _table_rows(text)
  assert row.startswith("| LeNet | 8 | 61,706 | ") and " | - | - | " in row
  assert "- LeNet: PyTorch peer not measured (the PyTorch peer's process exited with -9: " in text


def test_sides_take_their_windows_in_turn_and_one_that_stops_keeps_its_windows():
  order = []

  class Counted:
    def __init__(self, name, fail_after=None):
      self.name, self.fail_after, self.windows = name, fail_after, 0

    def warm_up(self, seconds):
      order.append(f"warm {self.name} {seconds:g}")

    def window(self, seconds):
      self.windows += 1
      order.append(f"window {self.name}")
      if self.fail_after is not None and self.windows > self.fail_after:
        return None
      return 100.0 * self.windows, 0.5 * (self.windows % 2)

  windows = harness.Windows(3, 1.0, 2.0, quiet_cores=0.1, settle_seconds=0.25)
  measured = harness.timed({"a": Counted("a"), "b": Counted("b", fail_after=1)}, 8, windows)
  assert order == ["warm a 2", "warm b 2",
                   *["warm a 0.25", "window a", "warm b 0.25", "window b"] * 3]
  assert measured["a"].rates == [100.0, 200.0, 300.0] and measured["a"].kept == [200.0]
  assert measured["b"].rates == [100.0] and measured["b"].batch_size == 8
  order.clear()
  harness.timed({"alone": Counted("alone")}, 8, windows)  # nothing to take turns with
  assert order == ["warm alone 2", "window alone", "window alone", "window alone"]


def test_a_peer_that_answers_nonsense_is_ended_with_what_it_said(monkeypatch):
  _peers_run("import os, sys, time; os.write(int(sys.argv[1]), b'hello\\n'); time.sleep(600)",
             monkeypatch)  # a line that is not JSON, then hangs
  monkeypatch.setattr(harness, "PEER_ANSWER_SECONDS", 60)
  start = time.monotonic()
  with harness.Peer({"conv": {}}) as peer:
    assert peer.failure == "answered 'hello'" and peer.variants == []
    assert peer._process.returncode == -signal.SIGKILL
  assert time.monotonic() - start < 30  # killed at once, not after the 60 s a peer is given


def test_a_peer_answers_each_command_and_reports_how_it_ended():
  pytest.importorskip("torch")
  conv = {"conv": {"x_shape": [2, 6, 6, 3], "kernel_shape": [3, 3, 3, 4], "strides": [1, 1],
                   "pads": [[1, 1], [1, 1]]}}
  with harness.Peer(conv) as peer:
    assert (peer.params, peer.variants, peer.failure) == (None, ["f32 channels_last"], None)
    side = peer.side("f32 channels_last")
    side.warm_up(0.0)
    rate, others = side.window(0.05)
    assert rate > 0 and others >= 0
    peer.ask({"variant": "no such variant", "window": 0.05})  # the peer raises KeyError
    assert peer.failure.startswith("the PyTorch peer's process exited with 1: KeyError: ")
    assert side.window(0.05) is None
def test_the_peers_run_without_the_commands_malloc_tunables(monkeypatch):
  monkeypatch.setenv("GLIBC_TUNABLES", runtime.malloc_tunables({}))
  assert "GLIBC_TUNABLES" not in harness.peer_environment()
  monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.arena_max=4")  # the user's own stand
  assert harness.peer_environment()["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=4"


class _Dense(nn.Module):
  @nn.compact
  def __call__(self, x, train=False):
    return nn.Dense(128, use_bias=False)(x.reshape(x.shape[0], -1))


class _Conv(nn.Module):
  @nn.compact
  def __call__(self, x, train=False):
    return nn.Conv(8, (3, 3), padding="VALID", use_bias=False)(x).sum((1, 2))


def test_train_flops_count_the_forward_and_the_kernel_gradient_not_the_input_gradient():
  before = runtime.onednn_in_use()
  # Products: forward 2 * in * out per image, kernel gradient as many; the loss adds ~1%.
  assert roofline.train_gflops(_Dense(), (4, 4, 16)) * 1e9 == pytest.approx(4 * 256 * 128,
                                                                             rel=0.02)
  conv = 2 * 6 * 6 * 3 * 3 * 4 * 8  # [8, 8, 4] -> [6, 6, 8], valid taps
  assert roofline.train_gflops(_Conv(), (8, 8, 4)) * 1e9 == pytest.approx(2 * conv, rel=0.02)
  assert runtime.onednn_in_use() == before  # the kernels' choice is given back


def test_peak_is_measured_where_the_steps_run_onednn():
  for dtype in ("float32", "bfloat16"):
    peak = roofline.peak_tflops(dtype, repeats=1)
    assert (peak is not None) == runtime.onednn_in_use(dtype)
    assert peak is None or peak > 0
  assert roofline.percent(0.1, 0.4) == "0.1 TFLOP/s (25% of peak)"
  assert roofline.percent(0.0123456, None) == "0.0123 TFLOP/s"


@pytest.mark.parametrize("with_torch", [
    False, pytest.param(True, marks=pytest.mark.slow)])
@pytest.mark.slow
def test_convs_mode_times_both_lowerings_of_each_shape(monkeypatch, capsys, with_torch):
  if with_torch:
    pytest.importorskip("torch")
  monkeypatch.setattr(conv_rows, "CONV_SHAPES", (
      conv_rows.ConvSpec("tiny 1x1", (2, 6, 6, 8), (1, 1, 8, 4), (2, 2), "SAME"),
      conv_rows.ConvSpec("tiny 3x3", (2, 8, 8, 32), (3, 3, 32, 8), (1, 1), ((0, 1), (1, 2)))))
  text = _run(["--mode=convs", *TINY] + ([] if with_torch else ["--no_torch"]), capsys)
  assert text.startswith("## Convolution lowering: lax vs cnnjax.models.conv: ")
  im2col, xla = _table_rows(text)
  lowering = "onednn" if onednn.available() else None
  assert im2col.startswith(f"| tiny 1x1 | 2x6x6x8 -> 3x3x4, 1x1/2 | {lowering or 'im2col'} | ")
  assert xla.startswith(f"| tiny 3x3 | 2x8x8x32 -> 7x9x8, 3x3/1 | {lowering or 'xla'} | ")
  ms, gflops, ratio = r"\d+\.\d\d( \(busy\))?", r"\d+\.\d", r"\d+\.\d\dx"
  for row in (im2col, xla):
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert all(re.fullmatch(ms, c) for c in cells[3:5])
    assert all(re.fullmatch(gflops, c) for c in cells[6:8])
    assert re.fullmatch(ratio, cells[9])
    if with_torch:  # the same work in PyTorch (asymmetric padding included)
      assert re.fullmatch(ms, cells[5]) and re.fullmatch(gflops, cells[8])
      assert re.fullmatch(ratio, cells[10]) and re.fullmatch(r"[0-3]/3", cells[11])
    else:
      assert cells[5] == cells[8] == cells[10] == "-"
      assert re.fullmatch(r"[012]/2", cells[11])
  assert "- Each row times a jitted `jax.value_and_grad`" in text


@pytest.mark.parametrize("args, message", [
    ([], r"--mode is required; expected one of models, convs, input"),
    (["--mode=speed"], r"flag --mode=speed: value should be one of <models\|convs\|input>"),
    (["--mode=models", "--only=lenet,vgg"], r"flag --only=lenet,vgg: unknown row 'vgg'"),
    (["--mode=models", "--model_batches=lenet=0"], r"'lenet=0'; expected <row>=<positive"),
    (["--mode=input", "--batch_sizes=32,x"], r"'x'; expected positive integers"),
    (["--mode=input", "--window_seconds=0"], r"flag --window_seconds=0.0: expected > 0"),
    (["--mode=convs", "extra"], r"unexpected arguments \['extra'\]"),
    (["--mode=input", "--source=/no/such/cifar.npz"], r"data file /no/such/cifar.npz not found"),
])
def test_bad_input_ends_with_one_error_line(args, message, capsys):
  with pytest.raises(SystemExit) as exit_info:
    bench.main(["benchmarks", *args])
  assert exit_info.value.code == 2
  (line,) = capsys.readouterr().err.splitlines()[-1:]
  assert re.match(f"^error: .*{message}", line)


@pytest.mark.slow
@pytest.mark.parametrize("cache", ["cold", "warm"])
def test_the_job_benchmark_times_whole_runs_and_writes_nothing(npz_path, tmp_path, cache):
  """``python -m benchmarks.job`` on a tiny CIFAR-shaped .npz: one row per variant (PyTorch's
  where torch is importable), the phases of cnnjax's time, nothing left in the directory or
  in the temporary one (``--cache=warm``'s shared compilation cache included)."""
  import importlib.util
  import os
  import subprocess
  import sys
  from benchmarks import job
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  temporary = tmp_path / "tmp"
  temporary.mkdir()
  done = subprocess.run([sys.executable, "-m", "benchmarks.job", "--data", str(npz_path),
                         f"--cache={cache}"],
                        cwd=tmp_path, capture_output=True, text=True,
                        env={**os.environ, "PYTHONPATH": root, "TMPDIR": str(temporary)},
                        timeout=600)
  assert done.returncode == 0, done.stderr[-2000:]
  text = done.stdout
  assert text.startswith("## The whole job, cifar_bn_fast: ")
  assert ("filled by an untimed run" in text) == (cache == "warm")
  assert not list(temporary.glob(f"{job.TEMPORARY}*"))  # (torch keeps its own caches there)
  rows = {row.split(" | ")[0][2:]: row for row in _table_rows(text)}
  expected = {"cnnjax f32"} | ({"cnnjax bf16"} if runtime.compute_dtype("bfloat16")[0] == "bfloat16"
                               else set())
  if importlib.util.find_spec("torch"):
    expected |= {name.replace("cnnjax", "torch") for name in expected}
  assert set(rows) == expected
  cells = [c.strip() for c in rows["cnnjax f32"].strip("|").split("|")]
  assert re.fullmatch(r"[\d.]+ \(\d+\)", cells[1])  # median wall (each run)
  assert all(float(c) >= 0 for c in cells[2:6])  # start-up, training, evaluation, writing
  assert re.fullmatch(r"[\d.]+% \([\d.]+%\)", cells[6])  # all test images (the lossless ones)
  assert re.search(r"^- Arithmetic \(benchmarks/roofline.py\): the model trains with [\d.]+ "
                   r"GFLOP per image .* Training phases sustained .*: cnnjax f32 [\d.]+ TFLOP/s",
                   text, re.M)
  assert sorted(tmp_path.iterdir()) == sorted([npz_path, temporary])
