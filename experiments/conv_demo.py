"""Classic kernels on a sample image: box blur, Gaussian blur and edge detection.

  python -m experiments.conv_demo --out /tmp/conv_demo

Writes ``DIR/conv_demo.png``: scikit-image's bundled ``camera`` photo (512x512 greyscale,
no download) next to its box-blurred, Gaussian-blurred and edge maps, each computed with
``cnnjax.conv_math.apply_kernel``.
"""
import math
import pathlib

import numpy as np
from absl import flags

from experiments import entry

FLAGS = entry.command_flags()
_OUT = flags.DEFINE_string("out", None, "Directory for the PNG.", flag_values=FLAGS)
_BOX = flags.DEFINE_integer("box_size", 9, "Side of the box blur.", lower_bound=1,
                            flag_values=FLAGS)
_SIGMA = flags.DEFINE_float("sigma", 2.0, "Gaussian sigma in pixels; the kernel side is "
                            "2*ceil(3*sigma)+1.", flag_values=FLAGS)


def panel(out: str | pathlib.Path, box_size: int = 9, sigma: float = 2.0) -> pathlib.Path:
  """Filters the sample image and writes ``out/conv_demo.png``; returns its path."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  from skimage import data

  from cnnjax import conv_math
  from cnnjax.errors import UserError
  if not 0 < sigma < math.inf:  # checked before ceil() below, which needs it finite
    raise UserError(f"--sigma must be a finite number > 0, got {sigma}")
  image = data.camera()  # [512, 512] uint8
  gaussian_size = 2 * math.ceil(3 * sigma) + 1
  edges = np.abs(conv_math.apply_kernel(image, conv_math.edge_kernel()))
  # (title, [H, W] float32, display maximum): blurs keep the 0..255 range, edge
  # magnitudes are clipped at their 99th percentile.
  panels = [
      ("camera", image.astype(np.float32), 255.0),
      (f"box blur {box_size}x{box_size}",
       conv_math.apply_kernel(image, conv_math.box_blur(box_size)), 255.0),
      (f"Gaussian sigma={sigma:g} ({gaussian_size}x{gaussian_size})",
       conv_math.apply_kernel(image, conv_math.gaussian_kernel(gaussian_size, sigma)),
       255.0),
      ("edges |Laplacian|", edges, float(np.percentile(edges, 99))),
  ]
  fig = Figure(figsize=(4 * len(panels), 4.4))
  FigureCanvasAgg(fig)
  for ax, (title, values, vmax) in zip(fig.subplots(1, len(panels)), panels):
    ax.imshow(values, cmap="gray", vmin=0.0, vmax=vmax)
    ax.set_title(title)
    ax.axis("off")
  fig.tight_layout()
  out = pathlib.Path(out)
  out.mkdir(parents=True, exist_ok=True)
  path = out / "conv_demo.png"
  fig.savefig(path, dpi=100)
  return path


def main() -> None:
  print(panel(_OUT.value, _BOX.value, _SIGMA.value))


def cli(argv: list[str] | None = None) -> None:
  """Runs the command on ``argv`` (default ``sys.argv``); exits with its status."""
  entry.run(main, doc=__doc__, fv=FLAGS, required=["out"], argv=argv)


if __name__ == "__main__":
  cli()
