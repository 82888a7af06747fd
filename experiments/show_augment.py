r"""A picture of a config's training augmentation: one training image and N augmented versions.

  python -m experiments.show_augment --config experiments/configs/keras_augment.py --out DIR \
      [--image 0] [--count 15] [--config.data.augment.rotation=40 ...]

The data come from ``cnnjax.data.sources.load(config.data.source, ...)`` and the augmentation
from ``cnnjax.data.augment.from_config(config.data.augment)``, exactly as a training run builds
them; the versions are drawn with ``config.seed``. Writes ``DIR/augment_<image>.png``.
"""
import pathlib

import numpy as np
from absl import flags

from experiments import entry

FLAGS = entry.command_flags()
_OUT = flags.DEFINE_string("out", None, "Directory for the PNG.", flag_values=FLAGS)
_IMAGE = flags.DEFINE_integer("image", 0, "Index of the training image.", flag_values=FLAGS)
_COUNT = flags.DEFINE_integer("count", 15, "Number of augmented versions.", flag_values=FLAGS)


def augmented_versions(config, index: int, count: int) -> tuple[np.ndarray, str]:
  """Training image ``index`` and ``count`` augmented versions of it.

  Args:
    config: a run config (``data.source``, ``data.tfds_data_dir``, ``data.image_size``,
      ``data.augment``, ``seed``).
    index: which training image (in the source's order, before the validation split).
    count: number of augmented versions, >= 1.
  Returns:
    ``(images, class_name)``: uint8 ``[1 + count, H, W, C]``, the original first.
  """
  from cnnjax.data import augment as augment_lib, sources
  from cnnjax.errors import UserError
  if count < 1:
    raise UserError(f"--count={count}; expected at least 1 augmented version")
  augment = augment_lib.from_config(config.data.augment.to_dict())
  if augment is None:
    raise UserError("config.data.augment turns every augmentation off; nothing to show "
                    "(set e.g. --config.data.augment.rotation=40)")
  data = sources.load(config.data.source, config.data.tfds_data_dir, config.data.image_size,
                      config.data.limit)
  images, labels = data.train
  if not 0 <= index < len(images):
    raise UserError(f"--image={index}; expected an index in [0, {len(images)})")
  original = images[index:index + 1]
  versions = augment(np.repeat(original, count, axis=0), np.random.default_rng(config.seed))
  return np.concatenate([original, versions]), data.class_names[labels[index]]


def write_grid(config, out: str | pathlib.Path, index: int, count: int) -> pathlib.Path:
  """Writes ``out/augment_<index>.png``: the original (titled with its class) then the versions."""
  from cnnjax import plots
  images, class_name = augmented_versions(config, index, count)
  titles = [f"#{index} {class_name}"] + [f"augmented {i}" for i in range(1, count + 1)]
  return plots.image_grid(images, pathlib.Path(out) / f"augment_{index}.png", titles=titles)


def main(config) -> None:
  print(f"wrote {write_grid(config, _OUT.value, _IMAGE.value, _COUNT.value)}")


def cli(argv: list[str] | None = None) -> None:
  """Runs the command on ``argv`` (default ``sys.argv``); exits with its status."""
  entry.run(main, doc=__doc__, fv=FLAGS, config=True, required=["out"], argv=argv)


if __name__ == "__main__":
  cli()
