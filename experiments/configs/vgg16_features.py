r"""The Keras book's feature extraction (Chollet, 5.3.1): VGG16's convolutional base
(include_top=False) runs once over 150x150 images into 4x4x512 features; on them a
classifier dense 256 + ReLU, dropout 0.5, one sigmoid output, binary cross-entropy,
RMSprop 2e-5, batch 20, 30 epochs. The book's data: cats vs dogs, 2000 train / 1000
validation / 1000 test images in train/, validation/, test/ class folders.

  python -m experiments.train --config experiments/configs/vgg16_features.py \
      --workdir runs/vgg16_features --config.data.source=~/data/cats_and_dogs_small

Weights: torchvision's ImageNet VGG16 (normalised as torchvision's models are); offline put
vgg16-397923af.pth in ~/.cache/torch/hub/checkpoints or pass --config.model.pretrained=FILE.
Any two-class image folder works, e.g. --config.data.source=../shared/data/hymenoptera.
"""
from experiments.configs import transfer_base


def get_config():
  c = transfer_base.transfer_config("vgg16", "features")
  c.data.source = "data/cats_and_dogs_small"
  c.data.image_size = 150
  c.model.num_classes = 1
  c.loss = "binary_cross_entropy"
  c.batch_size = 20
  c.eval_batch_size = 50
  c.num_epochs = 30
  c.optimizer.name = "rmsprop"
  c.optimizer.lr = 2e-5
  return c
