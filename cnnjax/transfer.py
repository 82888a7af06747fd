"""Feature extraction: a frozen backbone runs once over the data (cached in the workdir) and
only the head trains, on its features (``config.extract_features``).

Freezing inside a model (``optimizer.groups``) is ``optim.frozen_modules`` /
``optim.frozen_inference``; initial weights (pretrained, another run's) are ``cnnjax.initial``.
"""
import pathlib
import time
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import numpy as np

from cnnjax import initial, logs, steps
from cnnjax.data import pipeline
from cnnjax.errors import UserError
from cnnjax.models import TransferNet


def extract_features(backbone: nn.Module, variables: dict[str, Any],
                     normalize: Callable[[jax.Array], jax.Array], splits: Sequence[pipeline.Arrays],
                     batch_size: int) -> list[pipeline.Arrays]:
  """Runs ``backbone`` in inference mode once over each split.

  Args:
    backbone: maps normalised images to features ``[B, D]`` or ``[B, h, w, C]``.
    variables: its variables.
    normalize: uint8 images -> the backbone's float inputs (resizing included).
    splits: ``(images [N, H, W, C] uint8, labels [N])`` each.
    batch_size: images per forward pass.
  Returns:
    ``(features [N, h, w, C] float32, labels [N])`` per split; pooled ``[N, D]`` features
    become ``[N, 1, 1, D]``, so that the training loop takes them as images. A split given
    twice (an image folder's val/ as validation and test split) is run once.
  """
  def apply(v: dict[str, Any], x: jax.Array) -> jax.Array:
    return backbone.apply(v, normalize(x), train=False)
  done: dict[int, np.ndarray] = {}
  for images, _ in splits:
    if id(images) not in done:
      features = steps.apply_batched(apply, variables, images, batch_size, desc="Features")
      done[id(images)] = features.reshape(len(features), 1, 1, -1) if features.ndim == 2 else features
  return [(done[id(images)], labels) for images, labels in splits]


def feature_extraction(model: nn.Module, pretrained: str | None,
                       normalize: Callable[[jax.Array], jax.Array],
                       splits: Sequence[pipeline.Arrays], *, image_shape: Sequence[int], seed: int,
                       batch_size: int, cache: pathlib.Path | None,
                       fingerprint: str) -> tuple[nn.Module, list[pipeline.Arrays]]:
  """The head of a ``TransferNet`` and its backbone's features of each split.

  The backbone has the weights ``pretrained`` (or a random initialisation from ``seed``)
  and sees images normalised by ``normalize``, of shape ``image_shape`` after it; the
  features are reused from ``cache`` when its ``fingerprint`` matches (``cached_features``).
  """
  if not isinstance(model, TransferNet):
    raise UserError(f"config.extract_features needs a backbone and a head, i.e. "
                    f"config.model.name='transfer'; got {type(model).__name__}")
  backbone = model.backbone_model()

  def compute() -> list[pipeline.Arrays]:
    if pretrained:
      loaded = initial.pretrained_variables(model, "transfer", pretrained, image_shape, seed)
      variables = {col: tree["backbone"] for col, tree in loaded.items()}
    else:
      variables = steps.init_variables(backbone, (1, *image_shape), jax.random.PRNGKey(seed))
    return extract_features(backbone, variables, normalize, splits, batch_size)

  return model.head_model(), cached_features(cache, fingerprint, compute)


def cached_features(path: pathlib.Path | None, fingerprint: str,
                    compute: Callable[[], list[pipeline.Arrays]]) -> list[pipeline.Arrays]:
  """``compute()``'s features, stored in (and reused from) the ``.npz`` at ``path`` while
  ``fingerprint`` (what they were computed from) is unchanged; ``path=None``: no cache."""
  if path is not None and path.is_file():
    with np.load(path) as f:
      if str(f["fingerprint"]) == fingerprint:
        count = len([k for k in f.files if k.startswith("features_")])
        logs.say(f"Features from {path}")
        return [(f[f"features_{i}"], f[f"labels_{i}"]) for i in range(count)]
  start = time.time()
  splits = compute()
  logs.say(f"Extracted features {[s[0].shape for s in splits]} in {time.time() - start:.1f}s")
  if path is not None:
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {f"{kind}_{i}": a for i, split in enumerate(splits)
              for kind, a in zip(("features", "labels"), split)}
    np.savez(path, fingerprint=np.array(fingerprint), **arrays)
  return splits

