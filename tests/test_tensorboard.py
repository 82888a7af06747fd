import numpy as np
import pytest
from PIL import Image

from cnnjax import tensorboard
from tests.conftest import event_records


def test_crc32c_matches_the_standard_check_value_and_tensorboardx():
  from tensorboardX.crc32c import crc32c
  assert tensorboard.crc32c(b"123456789") == 0xE3069283  # RFC 3720's check value
  data = np.random.default_rng(0).integers(0, 256, 1000, np.uint8).tobytes()
  assert tensorboard.crc32c(data) == crc32c(data)


@pytest.mark.parametrize("start_step", [0, 40])
def test_events_decode_as_tensorboard_reads_them(tmp_path, start_step):
  png = tmp_path / "curves.png"
  Image.fromarray(np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)).save(png)  # RGBA 3x2
  events = tensorboard.Events(tmp_path, start_step)
  assert not list(tmp_path.glob("events.out.tfevents.*"))  # opened at the first event
  events.scalars("train", {"loss": 0.25, "accuracy": np.float32(0.5), "note": "x", "ok": True}, 50)
  events.flush()
  assert len(event_records(tmp_path)) == 2 + bool(start_step)  # readable before close
  events.image("curves", png, 60)
  events.scalars("test", {"step_count": 7}, 2**40)
  events.close()
  first, *rest = event_records(tmp_path)
  assert first.file_version == "brain.Event:2" and first.wall_time > 0
  if start_step:
    purge, *rest = rest
    assert purge.step == start_step and purge.session_log.status == purge.session_log.START
  scalars, image, big = rest
  assert scalars.step == 50 and [(v.tag, v.simple_value) for v in scalars.summary.value] == [
      ("train/loss", 0.25), ("train/accuracy", 0.5)]
  (value,) = image.summary.value
  assert (image.step, value.tag, value.image.height, value.image.width,
          value.image.colorspace) == (60, "curves", 2, 3, 4)
  assert value.image.encoded_image_string == png.read_bytes()
  assert big.step == 2**40 and big.summary.value[0].simple_value == 7.0


def test_after_close_events_go_to_the_same_file_without_a_second_purge(tmp_path):
  events = tensorboard.Events(tmp_path, start_step=5)
  events.scalars("train", {"loss": 1.0}, 5)
  events.close()
  events.scalars("train", {"loss": 3e39, "lr": -2.0}, 6)  # beyond float32: inf
  events.close()
  assert len(list(tmp_path.glob("events.out.tfevents.*"))) == 1
  records = event_records(tmp_path)
  assert [r.session_log.status for r in records].count(records[0].session_log.START) == 1
  assert [(v.tag, v.simple_value) for v in records[-1].summary.value] == [
      ("train/loss", float("inf")), ("train/lr", -2.0)]


def test_an_empty_scalar_set_writes_nothing(tmp_path):
  events = tensorboard.Events(tmp_path)
  events.scalars("train", {"note": "x"}, 1)
  events.close()
  assert not list(tmp_path.glob("events.out.tfevents.*"))
