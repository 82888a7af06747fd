r"""A frozen ImageNet ResNet-50 on CIFAR-10 upscaled to 224x224, as the Keras course builds
it: the base without its top (global average pooling) in inference mode, then dropout 0.2
and a dense softmax layer; Adam 1e-3, batch 64, 5 epochs, flips/rotations/zooms.

  python -m experiments.train --config experiments/configs/resnet50_cifar.py \
      --workdir runs/resnet50_cifar --config.data.source=../shared/data/cifar10.npz

Weights: torchvision's resnet50-0676ba61.pth (IMAGENET1K_V1), downloaded online; offline put
it in ~/.cache/torch/hub/checkpoints or pass --config.model.pretrained=FILE. Every epoch
runs ResNet-50 forward at 224 over 45k images: hours on a CPU.
"""
from experiments.configs import cifar_transfer


def get_config():
  c = cifar_transfer.get_config("resnet50,frozen")  # head: dropout 0.2 + dense
  c.num_epochs = 5
  c.optimizer.lr = 1e-3
  return c
