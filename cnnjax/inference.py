"""A trained model outside the training loop: its variables and class probabilities."""
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from cnnjax import train
from cnnjax.data import pipeline

CHECKPOINTS = ("best", "latest")  # the ``which`` of ``train.restore_run``


def model_variables(state: train.TrainState) -> dict[str, Any]:
  """``{'params': ..., 'batch_stats': ...}`` of ``state``, for ``model.apply``."""
  return {"params": state.params, "batch_stats": state.batch_stats}


def probabilities(logits: jax.Array, loss: str = "cross_entropy") -> jax.Array:
  """Class probabilities ``[B, K]`` from logits: softmax of ``[B, K]`` for
  'cross_entropy'; for 'binary_cross_entropy' the one sigmoid logit ``[B, 1]`` gives
  ``[1 - p, p]`` ``[B, 2]`` (class 1 is the positive class)."""
  if loss == "binary_cross_entropy":
    p = jax.nn.sigmoid(logits[:, :1])
    return jax.numpy.concatenate([1.0 - p, p], axis=-1)
  return jax.nn.softmax(logits)


def predict_proba(state: train.TrainState, normalize: Callable[[jax.Array], jax.Array],
                  images: np.ndarray, batch_size: int = 500, loss: str = "cross_entropy",
                  flip: bool = False, shift: int = 0) -> np.ndarray:
  """Class probabilities ``[N, K]`` (see ``probabilities``) of uint8 images
  ``[N, H, W, C]``, batch norm in inference mode, from the logits averaged over the
  test-time views ``flip`` and ``shift`` (``train.test_time_logits``; a run's
  ``config.eval_flip`` and ``config.eval_shift``). Batches are padded to ``batch_size``,
  so one program serves them all."""
  @jax.jit
  def probs(variables: dict[str, Any], batch: jax.Array) -> jax.Array:
    def logits_of(images: jax.Array) -> jax.Array:
      return state.apply_fn(variables, normalize(images), train=False)
    return probabilities(train.test_time_logits(logits_of, batch, flip, shift), loss)

  variables = model_variables(state)
  out = []
  for batch in pipeline.eval_batches((images, np.zeros(len(images), np.int64)), batch_size):
    out.append(np.asarray(probs(variables, batch["image"]))[batch["mask"]])
  return np.concatenate(out)
