r"""The R torch book's Tiny ImageNet convnet (luz): conv 64-128-256-512 (3x3, padding 1, ReLU,
max pooling), conv 1024, global average pooling, dense 1024, 1024, 200; Adam's defaults,
batch 128, 5 epochs, inputs scaled to [0, 1], the official val split for validation and test.

  python -m experiments.train --config experiments/configs/tiny_imagenet_cnn.py --workdir runs/tiny_cnn
  (downloads tiny-imagenet-200.zip, 248 MB, on first use; offline:
   --config.data.source=/path/tiny-imagenet-200.zip or the folder it unzips to)

The book gives no accuracy for this run ("too slow to run on a laptop without a decent GPU").
Not run on this machine: no copy of Tiny ImageNet is available offline here; the source is
tested on a generated miniature of the zip (tests/test_tiny_imagenet.py).
configs/tiny_imagenet_resnet18.py is the improved recipe.
"""
from experiments.configs import default


def get_config():
  c = default.get_config()
  c.model.name = "tiny_imagenet_cnn"
  c.model.num_classes = 200
  c.data.source = "tiny_imagenet"
  c.data.normalization = "unit"  # transform_to_tensor() alone
  c.optimizer.name = "adam"
  c.optimizer.lr = 1e-3
  c.optimizer.eps = 1e-8  # torch's default
  c.batch_size = 128
  c.num_epochs = 5
  return c
