r"""The Keras book's cats-vs-dogs convnet from scratch (conv 32-64-128-128, each followed by
max pooling, dropout 0.5, dense 512, one sigmoid output; binary cross-entropy, RMSprop 1e-4,
inputs scaled to [0, 1], 150x150) with its ImageDataGenerator augmentation: rotation 40,
shifts 0.2, shear 0.2, zoom 0.2, horizontal flip, nearest fill; batch 32, 100 epochs.
On any image folder of two classes; offline the hymenoptera folder (ants vs bees, 244 train /
153 val images: a eighth of the book's 2,000).

  python -m experiments.train --config experiments/configs/keras_cats_dogs.py --workdir runs/keras_cats_dogs \
      --config.data.source=../shared/data/hymenoptera
  (the book's run without augmentation: add --config.num_epochs=30 --config.batch_size=20
   --config.data.augment.rotation=0 --config.data.augment.width_shift=0
   --config.data.augment.height_shift=0 --config.data.augment.shear=0
   --config.data.augment.zoom=0 --config.data.augment.horizontal_flip=False)

The book gets ~71% without augmentation and ~82% with it on cats vs dogs. Result (2-core
AMD EPYC, 2026-12-04, seed 0, on the hymenoptera folder: 244 training images, an eighth of
the book's): 73.2% on the 153 val images after the 100 epochs (3.3-3.7 s each), 6.6 min wall.
The same images from EfficientNet-Lite0's ImageNet features (hymenoptera.py) reach 93.5%.
"""
from experiments.configs import default


def get_config():
  c = default.get_config()
  c.model.name = "keras_cats_dogs"
  c.model.num_classes = 1
  c.loss = "binary_cross_entropy"
  c.data.source = "data/hymenoptera"
  c.data.image_size = 150
  c.data.normalization = "unit"  # Keras' rescale=1./255
  c.optimizer.name = "rmsprop"
  c.optimizer.lr = 1e-4
  c.batch_size = 32
  c.eval_batch_size = 64
  c.num_epochs = 100
  a = c.data.augment
  a.rotation, a.width_shift, a.height_shift, a.shear, a.zoom = 40.0, 0.2, 0.2, 0.2, 0.2
  a.horizontal_flip, a.fill_mode = True, "nearest"
  return c
