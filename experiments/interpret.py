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

from cnnjax import inference, interpret
from experiments import cli

_WORKDIR = flags.DEFINE_string("workdir", None, "the --workdir of a finished experiment")
_IMAGE = flags.DEFINE_integer("image", None, "index of the test image to look at")
_LAYERS = flags.DEFINE_list("layers", None,
                            "layers whose channels to draw (default: the top-level conv layers)")
_CLASS = flags.DEFINE_integer("class_id", None, "class of the heat maps (default: the predicted one)")
_CAM_LAYER = flags.DEFINE_string("cam_layer", None,
                                 "Grad-CAM layer (default: the last top-level conv layer)")
_PATTERN_LAYER = flags.DEFINE_string("pattern_layer", None,
                                     "layer of the gradient-ascent patterns (default: as --cam_layer)")
_PATTERNS = flags.DEFINE_integer("patterns", 16, "channels to find patterns for (0: skip)",
                                 lower_bound=0)
_STEPS = flags.DEFINE_integer("steps", 100, "gradient-ascent steps", lower_bound=1)
_WHICH = flags.DEFINE_enum("which", "best", list(inference.CHECKPOINTS), "checkpoint to look at")


def write() -> None:
  """Writes the pictures for the flags' run and image and prints their paths."""
  written = interpret.write_pictures(
      _WORKDIR.value, _IMAGE.value, layers=_LAYERS.value, class_id=_CLASS.value,
      cam_layer=_CAM_LAYER.value, pattern_layer=_PATTERN_LAYER.value,
      num_patterns=_PATTERNS.value, steps=_STEPS.value, which=_WHICH.value)
  print("\n".join(str(path) for path in written))


if __name__ == "__main__":
  flags.mark_flags_as_required(["workdir", "image"])
  cli.run(write)
