"""Classic kernels on a sample image: box blur, Gaussian blur and edge detection.

  python -m experiments.conv_demo --out /tmp/conv_demo

Writes ``DIR/conv_demo.png``: scikit-image's bundled ``camera`` photo (512x512 greyscale,
no download) next to its box-blurred, Gaussian-blurred and edge maps, each computed with
``cnnjax.conv_math.apply_kernel``.
"""
import argparse
import math
import pathlib
import sys
from collections.abc import Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from skimage import data

from cnnjax import conv_math
from cnnjax.errors import UserError


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", type=pathlib.Path, required=True, help="directory for the PNG")
  parser.add_argument("--box_size", type=int, default=9, help="side of the box blur")
  parser.add_argument("--sigma", type=float, default=2.0,
                      help="Gaussian sigma in pixels; the kernel side is 2*ceil(3*sigma)+1")
  return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> pathlib.Path:
  """Filters the sample image and writes the panel; returns the PNG's path."""
  args = _parse(argv)
  if not 0 < args.sigma < math.inf:  # checked before ceil() below, which needs it finite
    raise UserError(f"--sigma must be a finite number > 0, got {args.sigma}")
  image = data.camera()  # [512, 512] uint8
  gaussian_size = 2 * math.ceil(3 * args.sigma) + 1
  edges = np.abs(conv_math.apply_kernel(image, conv_math.edge_kernel()))
  # (title, [H, W] float32, display maximum): blurs keep the 0..255 range, edge
  # magnitudes are clipped at their 99th percentile.
  panels = [
      ("camera", image.astype(np.float32), 255.0),
      (f"box blur {args.box_size}x{args.box_size}",
       conv_math.apply_kernel(image, conv_math.box_blur(args.box_size)), 255.0),
      (f"Gaussian sigma={args.sigma:g} ({gaussian_size}x{gaussian_size})",
       conv_math.apply_kernel(image, conv_math.gaussian_kernel(gaussian_size, args.sigma)),
       255.0),
      ("edges |Laplacian|", edges, float(np.percentile(edges, 99))),
  ]
  fig = Figure(figsize=(4 * len(panels), 4.4))
  FigureCanvasAgg(fig)
  for ax, (title, panel, vmax) in zip(fig.subplots(1, len(panels)), panels):
    ax.imshow(panel, cmap="gray", vmin=0.0, vmax=vmax)
    ax.set_title(title)
    ax.axis("off")
  fig.tight_layout()
  args.out.mkdir(parents=True, exist_ok=True)
  path = args.out / "conv_demo.png"
  fig.savefig(path, dpi=100)
  return path


if __name__ == "__main__":
  try:
    print(main())
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
