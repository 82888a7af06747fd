r"""A picture of a config's training augmentation: one training image and N augmented versions.

  python -m experiments.show_augment --config experiments/configs/keras_augment.py --out DIR \
      [--image 0] [--count 15] [--config.data.augment.rotation=40 ...]

The data come from ``cnnjax.data.sources.load(config.data.source, ...)`` and the augmentation
from ``cnnjax.train.make_augment(config.data.augment)``, exactly as a training run builds
them; the versions are drawn with ``config.seed``. Writes ``DIR/augment_<image>.png``.
"""
import pathlib
import sys

import numpy as np
from absl import flags
from ml_collections import config_flags

import cnnjax  # noqa: F401  (XLA CPU defaults before JAX starts)
from cnnjax import plots, train
from cnnjax.data import sources
from cnnjax.errors import UserError
from experiments import main as main_lib


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
  if count < 1:
    raise UserError(f"--count={count}; expected at least 1 augmented version")
  augment = train.make_augment(config.data.augment)
  if augment is None:
    raise UserError("config.data.augment turns every augmentation off; nothing to show "
                    "(set e.g. --config.data.augment.rotation=40)")
  data = sources.load(config.data.source, config.data.tfds_data_dir, config.data.image_size)
  images, labels = data.train
  if not 0 <= index < len(images):
    raise UserError(f"--image={index}; expected an index in [0, {len(images)})")
  original = images[index:index + 1]
  versions = augment(np.repeat(original, count, axis=0), np.random.default_rng(config.seed))
  return np.concatenate([original, versions]), data.class_names[labels[index]]


def write_grid(config, out: str | pathlib.Path, index: int, count: int) -> pathlib.Path:
  """Writes ``out/augment_<index>.png``: the original (titled with its class) then the versions."""
  images, class_name = augmented_versions(config, index, count)
  titles = [f"#{index} {class_name}"] + [f"augmented {i}" for i in range(1, count + 1)]
  return plots.image_grid(images, pathlib.Path(out) / f"augment_{index}.png", titles=titles)


def main(argv: list[str]) -> None:
  """Parses ``argv`` (program name first) and writes the grid; errors end as one line."""
  fv = flags.FlagValues()  # private flags: experiments.main owns the global --config
  config = config_flags.DEFINE_config_file("config", None, "Path to a config file.",
                                           flag_values=fv, lock_config=True, sys_argv=argv)
  out = flags.DEFINE_string("out", None, "Directory for the PNG.", flag_values=fv)
  image = flags.DEFINE_integer("image", 0, "Index of the training image.", flag_values=fv)
  count = flags.DEFINE_integer("count", 15, "Number of augmented versions.", flag_values=fv)
  flags.mark_flags_as_required(["config", "out"], flag_values=fv)
  try:
    fv(argv)
    config.value.keys()  # loads the file and applies the overrides now
  except Exception as e:  # absl/ml_collections raise many types, all with deep tracebacks
    print(f"error: {main_lib.explain_flag_error(argv, e)}", file=sys.stderr)
    sys.exit(2)
  try:
    path = write_grid(config.value, out.value, image.value, count.value)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  print(f"wrote {path}")


if __name__ == "__main__":
  main(sys.argv)
