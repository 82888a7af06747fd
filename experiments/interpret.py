r"""Looking inside a finished run: activations, filters, preferred patterns, CAM and Grad-CAM.

  python -m experiments.interpret --workdir runs/cifar_bn --image 7 [--layers Conv_0,Conv_7] \
      [--class_id 3] [--cam_layer L] [--pattern_layer L] [--patterns 16] [--steps 100]

For test image ``--image`` of the run (best checkpoint; ``--which=latest`` for the last),
writes PNGs into ``RUN/interpret/``: every channel of each layer in ``--layers``, the
first convolution's kernels, the patterns that most excite the first ``--patterns``
channels of ``--pattern_layer`` (gradient ascent on the input), and the image with its
Grad-CAM heat map at ``--cam_layer`` (plus CAM for ResNet/EfficientNet). Layers are module
paths such as ``ConvBlock_1``, ``layer4_1`` or ``layer4_1/conv2``; an unknown name is an
error that lists the valid ones. Defaults: the model's top-level conv layers, the class it
predicts, and its last top-level conv layer for Grad-CAM and the patterns.
"""
from absl import flags

from experiments import entry

FLAGS = entry.command_flags()
_WORKDIR = flags.DEFINE_string("workdir", None, "the --workdir of a finished experiment",
                               flag_values=FLAGS)
_IMAGE = flags.DEFINE_integer("image", None, "index of the test image to look at",
                              flag_values=FLAGS)
_LAYERS = flags.DEFINE_list("layers", None,
                            "layers whose channels to draw (default: the top-level conv layers)",
                            flag_values=FLAGS)
_CLASS = flags.DEFINE_integer("class_id", None, "class of the heat maps (default: the predicted one)",
                              flag_values=FLAGS)
_CAM_LAYER = flags.DEFINE_string("cam_layer", None,
                                 "Grad-CAM layer (default: the last top-level conv layer)",
                                 flag_values=FLAGS)
_PATTERN_LAYER = flags.DEFINE_string("pattern_layer", None,
                                     "layer of the gradient-ascent patterns (default: as --cam_layer)",
                                     flag_values=FLAGS)
_PATTERNS = flags.DEFINE_integer("patterns", 16, "channels to find patterns for (0: skip)",
                                 lower_bound=0, flag_values=FLAGS)
_STEPS = flags.DEFINE_integer("steps", 100, "gradient-ascent steps", lower_bound=1,
                              flag_values=FLAGS)
_WHICH = flags.DEFINE_enum("which", "best", ["best", "latest"], "checkpoint to look at",
                           flag_values=FLAGS)


def main() -> None:
  """Writes the pictures for the flags' run and image and prints their paths."""
  from cnnjax import interpret
  written = interpret.write_pictures(
      _WORKDIR.value, _IMAGE.value, layers=_LAYERS.value, class_id=_CLASS.value,
      cam_layer=_CAM_LAYER.value, pattern_layer=_PATTERN_LAYER.value,
      num_patterns=_PATTERNS.value, steps=_STEPS.value, which=_WHICH.value)
  print("\n".join(str(path) for path in written))


def cli(argv: list[str] | None = None) -> None:
  """Runs the command on ``argv`` (default ``sys.argv``); exits with its status."""
  entry.run(main, doc=__doc__, fv=FLAGS, required=["workdir", "image"], argv=argv)


if __name__ == "__main__":
  cli()
