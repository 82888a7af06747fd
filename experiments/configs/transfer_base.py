"""What every transfer study shares: a pretrained backbone with a new head, by workflow.

``transfer_config(backbone, workflow)``, workflow one of:
  features  the backbone runs once over the (unaugmented) images, cached in the workdir;
            a head dense 256 + ReLU, dropout 0.5 is trained on the features (the Keras
            book's feature extraction).
  frozen    the backbone frozen (no updates, no optimizer state, batch norm in inference
            mode); a head dropout 0.2 + dense (the ImageNet models' own classifier, as in
            Keras' EfficientNet fine-tuning guide) trained end to end on augmented images;
            evaluated with test-time flips (eval_flip).
  finetune  as frozen, but the convolutions of the backbone's last stage train too, at 1/10
            of the learning rate; its batch norms stay frozen, so in inference mode (Keras'
            advice: batch statistics of small batches would upset the pretrained ones).
            Start it from the frozen run: --config.init_from=<its workdir> (without, it
            starts from the pretrained backbone and a fresh head).
"""
import ml_collections

from experiments.configs import default

# backbone -> (pretrained weights, their normalisation, regex of the paths of its last
# stage's convolution weights under backbone/)
BACKBONES = {
    "efficientnet_lite0": ("package", "lite", r"(blocks_15/\w+_conv|conv_head)/kernel"),
    "resnet18": ("torchvision", "imagenet", r"layer4_\d+/(conv\d|downsample_0)/kernel"),
    "resnet34": ("torchvision", "imagenet", r"layer4_\d+/(conv\d|downsample_0)/kernel"),
    "resnet50": ("torchvision", "imagenet", r"layer4_\d+/(conv\d|downsample_0)/kernel"),
    "vgg16": ("torchvision", "imagenet", r"block5_conv\d/(kernel|bias)"),
}
WORKFLOWS = ("features", "frozen", "finetune")


def parse(arg: str) -> tuple[str, str]:
  """'efficientnet_lite0,frozen' -> (backbone, workflow), both checked."""
  backbone, _, workflow = arg.partition(",")
  if backbone not in BACKBONES or workflow not in WORKFLOWS:
    raise ValueError(f"config argument {arg!r}; expected '<backbone>,<workflow>' with backbone "
                     f"in {sorted(BACKBONES)} and workflow in {list(WORKFLOWS)}")
  return backbone, workflow


def transfer_config(backbone: str, workflow: str) -> ml_collections.ConfigDict:
  """The default config with model 'transfer' and the workflow's settings; the study sets
  the data, classes and recipe."""
  pretrained, normalization, last_convs = BACKBONES[backbone]
  c = default.get_config()
  c.model.name = "transfer"
  c.model.backbone = backbone
  c.model.pretrained = pretrained
  c.data.normalization = normalization
  if workflow == "features":
    c.model.hidden, c.model.dropout_rate = (256,), 0.5
    c.extract_features = True
    return c
  c.model.hidden, c.model.dropout_rate = (), 0.2
  c.data.augment.horizontal_flip = True
  c.eval_flip = True  # logits averaged over each image and its mirror
  c.data.augment.rotation = 10.0
  c.data.augment.zoom = 0.1
  if workflow == "frozen":
    c.optimizer.groups = ("backbone/.*:frozen", "head/.*:1.0")
  else:
    c.optimizer.groups = (f"backbone/({last_convs}):0.1",
                          f"backbone/(?!({last_convs})$).*:frozen", "head/.*:1.0")
  return c
