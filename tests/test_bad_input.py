"""Bad input gets one line naming the bad value and what was expected (exit status 2 from the
commands, ``UserError`` from the Learner), before anything is written; and what a user
expects to work (one image to predict, whole-number float labels) works.

The faults (a second run in a workdir, a damaged checkpoint, a full disk) are in
``test_workdir.py``; a crafted CIFAR archive in ``test_tfds_safety.py``.
"""
import re
import shutil

import numpy as np
import pytest
from PIL import Image

import cnnjax
from cnnjax.errors import UserError
from experiments import train as train_command
from tests.conftest import make_images


def _one_error_line(capsys, argv) -> str:
  with pytest.raises(SystemExit) as exit_:
    train_command.cli(["train", *argv])
  assert exit_.value.code == 2
  lines = capsys.readouterr().err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: "), lines
  return lines[0]


def _npz(path, x_train, y_train, x_test=None, y_test=None):
  x_test = x_train[:8] if x_test is None else x_test
  y_test = y_train[:8] if y_test is None else y_test
  np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
  return path


@pytest.fixture
def bad_sources(tmp_path):
  """name -> a data source with one fault."""
  x, y = make_images(64)
  two = tmp_path / "two_classes"
  for k, name in enumerate(["ants", "bees"]):
    (two / name).mkdir(parents=True)
    for i in range(4):
      Image.fromarray(x[4 * k + i]).save(two / name / f"{i}.png")
  (tmp_path / "text.npz").write_text("not an archive\n")
  np.savez(tmp_path / "empty.npz")
  y_neg = y.copy()
  y_neg[5] = -1
  return {"good": _npz(tmp_path / "good.npz", x, y), "text": tmp_path / "text.npz",
          "empty": tmp_path / "empty.npz",
          "negative_label": _npz(tmp_path / "neg.npz", x, y_neg),
          "no_train": _npz(tmp_path / "none.npz", x[:0], y[:0], x[:8], y[:8]),
          "small": _npz(tmp_path / "small.npz", x[:12], y[:12]),
          "float_labels": _npz(tmp_path / "float.npz", x, y + 0.5),
          "two_classes": two}


CASES = [  # (overrides, the error line's pattern)
    (["--config.batch_size=-1"], r"config.batch_size=-1; expected an integer in \[1, inf\)"),
    (["--config.batch_size=0"], r"config.batch_size=0; expected an integer in \[1, inf\)"),
    (["--config.seed=-1"], r"config.seed=-1; expected an integer in \[0, 2\*\*31\)"),
    (["--config.seed=2147483648"], r"config.seed=2147483648; expected an integer in \[0, 2\*\*31\)"),
    (["--config.eval_batch_size=0"], r"config.eval_batch_size=0; expected an integer"),
    (["--config.num_epochs=0"], r"config.num_epochs=0; expected an integer in \[1, inf\)"),
    (["--config.optimizer.lr=-0.1"], r"config.optimizer.lr=-0.1; expected a number in \(0, inf\)"),
    (["--config.label_smoothing=5.0"], r"config.label_smoothing=5.0; expected a number in \[0, 1\)"),
    (["--config.data.val_size=-3.0"], r"config.data.val_size=-3.0; expected a number in \[0"),
    (["--config.schedule.pct_start=1.5"], r"config.schedule.pct_start=1.5; expected"),
    (["--config.data.augment.zoom=2.0"], r"config.data.augment.zoom=2.0; expected"),
    (["--config.test_with=worst"], r"config.test_with='worst'; expected 'last' or 'best'"),
    (["--config.init=keras"], r"config.init='keras'; expected one of \['flax', 'torch'\]"),
    (["stray"], r"unexpected arguments \['stray'\]; expected only --flags"),
    (["--config.data.source={good}", "--config.model.num_classes=1"],
     r"num_classes=1 with config.loss='cross_entropy' learns nothing"),
    (["--config.data.source={text}"], r"text.npz is not an .npz archive; expected"),
    (["--config.data.source={empty}"], r"empty.npz has no array\(s\) \['x_train'"),
    (["--config.data.source={negative_label}"], r"data has label -1 but .*expected labels in "
                                                r"\[0, 10\)"),
    (["--config.data.source={no_train}"], r"the training split is empty"),
    (["--config.data.source={small}", "--config.data.val_size=0", "--config.batch_size=16"],
     r"batch_size=16 is larger than the 12 training examples"),
    (["--config.data.source={float_labels}"], r"labels have dtype float64 \(e.g. \d+.5\); "
                                              r"expected integer class indices"),
    (["--config.data.source={two_classes}", "--config.data.image_size=32"],
     r"data has 2 classes \(ants, bees\) but config.model.num_classes=10; expected "
     r"num_classes=2"),
]


@pytest.mark.parametrize("overrides,pattern", CASES, ids=[" ".join(c[0]) for c in CASES])
def test_a_bad_run_input_is_one_line_and_writes_nothing(overrides, pattern, bad_sources,
                                                        tmp_path, capsys):
  workdir = tmp_path / "run"
  argv = ["--config", "experiments/configs/runlocal.py", "--workdir", str(workdir)]
  argv += [arg.format(**bad_sources) for arg in overrides]
  assert re.search(pattern, _one_error_line(capsys, argv))
  assert not workdir.exists()


def test_a_workdir_that_is_a_file_is_one_line(tmp_path, capsys):
  (tmp_path / "notes.txt").write_text("mine")
  line = _one_error_line(capsys, ["--config", "experiments/configs/runlocal.py",
                                  "--workdir", str(tmp_path / "notes.txt")])
  assert re.search(r"--workdir .*notes.txt is a file; expected a directory", line)
  assert (tmp_path / "notes.txt").read_text() == "mine"


@pytest.fixture(scope="module")
def data():
  return make_images(48)


@pytest.mark.parametrize("call,pattern", [
    (lambda x, y: cnnjax.Learner("seed_cnn", (x, y.astype(str))),
     r"train labels have dtype <U\d+ \(e.g. '\d'\); expected integer class indices"),
    (lambda x, y: cnnjax.Learner("seed_cnn", (x, y + 0.5)), r"labels have dtype float64"),
    (lambda x, y: cnnjax.Learner("seed_cnn", (x, y), batch_size=0),
     r"^batch_size=0; expected an integer in \[1, inf\)"),
    (lambda x, y: cnnjax.Learner("seed_cnn", (x, y), batch_size=-4), r"^batch_size=-4"),
    (lambda x, y: cnnjax.Learner("seed_cnn", (x, y), lr=-1.0), r"^lr=-1.0; expected a number"),
    (lambda x, y: cnnjax.Learner("seed_cnn", (x[:0], y[:0])), r"the training split is empty"),
    (lambda x, y: cnnjax.Learner("seed_cnn", (x, np.where(np.arange(len(y)) == 3, -1, y)),
                                 batch_size=8), r"data has label -1"),
], ids=["string labels", "float labels", "batch 0", "batch -4", "lr < 0", "empty", "label -1"])
def test_bad_learner_arguments_are_one_user_error(call, pattern, data):
  with pytest.raises(UserError, match=pattern):
    call(*data)


@pytest.fixture(scope="module")
def learner(data):
  return cnnjax.Learner("seed_cnn", data, batch_size=8, val_size=8)


@pytest.mark.parametrize("call,pattern", [
    (lambda ln: ln.fit(0), r"^epochs=0; expected an integer in \[1, inf\)"),
    (lambda ln: ln.fit(-2), r"^epochs=-2"),
    (lambda ln: ln.fit(1, lr=-5.0), r"^lr=-5.0; expected a number in \(0, inf\)"),
    (lambda ln: ln.fit_one_cycle(1, max_lr=0), r"^max_lr=0"),
    (lambda ln: ln.predict(np.zeros((2, 28, 28, 3), np.uint8)),
     r"images have shape \(28, 28, 3\); expected \[N, 32, 32, 3\] or one image"),
    (lambda ln: ln.predict(np.zeros((2, 32, 32, 3), np.uint8), batch_size=0), r"^batch_size=0"),
], ids=["fit(0)", "fit(-2)", "fit lr < 0", "max_lr 0", "predict shape", "predict batch 0"])
def test_bad_learner_calls_are_one_user_error(call, pattern, learner):
  with pytest.raises(UserError, match=pattern):
    call(learner)


def test_predict_takes_one_image_or_none(learner, data):
  x, _ = data
  assert learner.predict(x[0]).shape == (10,)
  np.testing.assert_allclose(learner.predict(x[0]), learner.predict(x[:1])[0], rtol=1e-6)
  assert learner.predict(x[:0]).shape == (0, 10)


def test_whole_number_float_labels_are_labels(data):
  x, y = data
  learner = cnnjax.Learner("seed_cnn", (x, y.astype(np.float32)), batch_size=8, val_size=8)
  assert learner.data.train[1].dtype == np.int64
  np.testing.assert_array_equal(learner.data.train[1], y)


def test_save_refuses_a_file_or_a_folder_of_other_files(learner, tmp_path):
  (tmp_path / "file").write_text("mine")
  with pytest.raises(UserError, match=r"file is a file; expected a directory to save"):
    learner.save(tmp_path / "file")
  (tmp_path / "folder").mkdir()
  (tmp_path / "folder" / "notes.txt").write_text("mine")
  with pytest.raises(UserError, match=r"folder holds other files; expected a new directory"):
    learner.save(tmp_path / "folder")
  assert (tmp_path / "file").read_text() == "mine"
  assert [p.name for p in (tmp_path / "folder").iterdir()] == ["notes.txt"]


def test_load_of_a_save_without_its_state_is_one_user_error(learner, tmp_path):
  learner.save(tmp_path / "saved")
  shutil.rmtree(tmp_path / "saved" / "checkpoints")
  with pytest.raises(UserError, match=r"saved/checkpoints holds no saved state"):
    cnnjax.Learner.load(tmp_path / "saved")
