"""How close a train step runs to what this machine's cores can compute: its peak TFLOP/s and
a model's FLOPs per trained image (``--mode=models``' and ``benchmarks.job``'s arithmetic
notes).

Peak: the best of ``repeats`` timings of one large 1x1 convolution through ``cnnjax.onednn``,
``[1, 64, 64, 1024]`` by ``[1, 1, 1024, 1024]`` (a 4096 x 1024 x 1024 matrix product): the
kernels the steps run, at a shape where they are at their best. FLOPs: XLA's count (2 per
multiply-add, a padded convolution's valid taps only) of the parameters' gradient of the loss
on one batch with XLA's own kernels, lowered, not compiled: the forward pass and both backward
products, but not the input's gradient, as a train step needs.
"""
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from cnnjax import onednn, runtime

PEAK_SHAPE = (64, 64, 1024)  # [H, W, C] of the peak's 1x1 convolution, C in and out


def peak_tflops(dtype: str, repeats: int = 7) -> float | None:
  """Best TFLOP/s of the peak's convolution in ``dtype`` ('float32' or 'bfloat16'), or None
  where the steps do not run oneDNN in that dtype (``runtime.onednn_in_use``)."""
  if not runtime.onednn_in_use(dtype):
    return None
  h, w, c = PEAK_SHAPE
  x = jnp.ones((1, h, w, c), dtype)
  kernel = jnp.full((1, 1, c, c), 0.01, dtype)
  product = jax.jit(lambda x, k: onednn.conv(x, k, (1, 1), ((0, 0), (0, 0))))
  product(x, kernel).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    product(x, kernel).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2 * h * w * c * c / best / 1e12


def train_gflops(model: nn.Module, image_shape: tuple[int, int, int], batch_size: int = 8
                 ) -> float:
  """GFLOP per image of training ``model`` (batch norm in train mode, dropout on) on images
  ``[H, W, C]``: XLA's count of the loss's gradient with respect to every parameter."""
  previous = runtime.onednn_in_use()
  runtime.configure(onednn=False)  # XLA's kernels: a custom call has no FLOP count
  try:
    images = jax.ShapeDtypeStruct((batch_size, *image_shape), jnp.float32)
    labels = jax.ShapeDtypeStruct((batch_size,), jnp.int32)
    key = jax.random.PRNGKey(0)
    variables = jax.eval_shape(
        lambda x: model.init({"params": key, "dropout": key}, x, train=False), images)
    params = variables["params"]
    others = {k: v for k, v in variables.items() if k != "params"}

    def loss(params, others, x, y):
      logits, _ = model.apply({"params": params, **others}, x, train=True,
                              mutable=["batch_stats"], rngs={"dropout": key})
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    cost = jax.jit(jax.grad(loss)).lower(params, others, images, labels).cost_analysis()
  finally:
    runtime.configure(onednn=previous)
  return cost["flops"] / batch_size / 1e9


def percent(tflops: float, peak: float | None) -> str:
  """``tflops`` as '0.19 TFLOP/s (84% of peak)', without the share where no peak."""
  share = f" ({100 * tflops / peak:.0f}% of peak)" if peak else ""
  return f"{tflops:.3g} TFLOP/s{share}"
