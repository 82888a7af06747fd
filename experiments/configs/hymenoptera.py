r"""Ants vs bees (the PyTorch transfer-learning tutorial's hymenoptera image folder, 244
train / 153 val images), from an ImageNet backbone. Argument: '<backbone>,<workflow>'
(experiments/configs/transfer_base.py).

  python -m experiments.train --workdir runs/hym_lite0_features \
      --config experiments/configs/hymenoptera.py:efficientnet_lite0,features \
      --config.data.source=../shared/data/hymenoptera
  python -m experiments.train --workdir runs/hym_lite0_frozen \
      --config experiments/configs/hymenoptera.py:efficientnet_lite0,frozen \
      --config.data.source=../shared/data/hymenoptera
  python -m experiments.train --workdir runs/hym_lite0_finetune \
      --config experiments/configs/hymenoptera.py:efficientnet_lite0,finetune \
      --config.data.source=../shared/data/hymenoptera

val/ is both the validation and the test split, as in the tutorial. ResNet-18 needs
torchvision's weights: online they are downloaded; offline put resnet18-f37072fd.pth in
~/.cache/torch/hub/checkpoints or pass --config.model.pretrained=/path/to/file.

Results on this machine (EfficientNet-Lite0, real ImageNet weights; val accuracy of the last
epoch, 153 images):
  features 93.5% (seed 0; extraction 17 s, head 30 epochs in seconds);
  frozen 94.8% (145/153, seed 0; 94.1% without eval_flip; 77 s wall, 4 s epochs, on the
  2-core Intel Xeon of BENCHMARKS.md; --config.precision=bfloat16: 52 s, 2 s epochs);
  finetune 96.1% (147/153) for each of seeds 0, 1, 2, ~2 min wall each (10 epochs of ~8 s
  after a 16 s first): the new head starts from ImageNet's ant (310) and bee (309)
  classifier rows (model.head_classes; the ImageNet classifier alone gets 96.7%, zero_shot.py),
  the last stage trains at 1/10 of the head's 1e-4, decayed by a cosine schedule.
  Earlier finetune recipes, for the record: from the frozen run's fresh head, constant 1e-4:
  94.1%; unfreezing stages 6-7 with label smoothing 0.1: 93.5%; head rows + frozen run
  (lr 1e-3) then constant 1e-4: 94.8%. A fresh head trained on 244 images loses part of
  what the pretrained classifier knew; starting from its rows, at a small decaying rate,
  keeps it.
"""
from experiments.configs import transfer_base


def get_config(arg: str = "efficientnet_lite0,features"):
  backbone, workflow = transfer_base.parse(arg)
  c = transfer_base.transfer_config(backbone, workflow)
  c.data.source = "data/hymenoptera"
  c.data.image_size = 224
  c.model.num_classes = 2
  c.batch_size = 32
  c.eval_batch_size = 64
  c.optimizer.name = "adam"
  # features: the head alone on cached features, cheap; the others run the backbone.
  c.num_epochs, c.optimizer.lr = {"features": (30, 1e-4), "frozen": (15, 1e-3),
                                  "finetune": (10, 1e-4)}[workflow]
  if workflow == "finetune":
    if backbone == "efficientnet_lite0":
      c.model.head_classes = (310, 309)  # ImageNet's ant and bee
    c.schedule.name = "warmup_cosine"  # no warmup, cosine decay to 0
  return c
