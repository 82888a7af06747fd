r"""CIFAR-10 upscaled to an ImageNet backbone's 224x224, from its pretrained weights.
Argument: '<backbone>,<workflow>' (experiments/configs/transfer_base.py).

  python -m experiments.train --workdir runs/cifar_lite0_features \
      --config experiments/configs/cifar_transfer.py:efficientnet_lite0,features \
      --config.data.source=../shared/data/cifar10.npz

Each batch is resized in the compiled step (data.input_size), so memory holds CIFAR's
32x32 images (180 MB), not 224x224 ones (7.5 GB). Running the backbone over 60k images at
224 takes ~40 min on 2 CPU cores (Lite0); --config.data.input_size=160 halves it, and
--config.data.limit=20000 uses 15k/5k train/validation images (the whole test set).

Result on this machine (Lite0 features, input_size=160, limit=20000: 30k images through the
backbone in 5 min, the head in 30 s; 5.6 min wall, 1.4 GB peak memory): validation 88.6%,
test 89.3% on the 1,000 lossless images, 79.1% on 10k (9k JPEG): the JPEG artefacts of the
32x32 images, blown up 5x, cost ImageNet features ~11 points.
"""
from experiments.configs import transfer_base


def get_config(arg: str = "efficientnet_lite0,features"):
  backbone, workflow = transfer_base.parse(arg)
  c = transfer_base.transfer_config(backbone, workflow)
  c.data.source = "cifar10"
  c.data.input_size = 224
  c.data.val_size = 5000.0
  c.model.num_classes = 10
  c.batch_size = 64
  c.eval_batch_size = 100
  c.optimizer.name = "adam"
  # features: the head alone on cached features, cheap; the others run the backbone.
  c.num_epochs, c.optimizer.lr = {"features": (30, 1e-4), "frozen": (3, 1e-3),
                                  "finetune": (2, 1e-4)}[workflow]
  return c
