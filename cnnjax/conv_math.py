"""Convolution arithmetic from scratch: output sizes, cross-correlation, pooling, kernels.

Teaching code made executable: every function here is checked against the library
primitive it explains (``jax.lax.conv_general_dilated``, ``flax.linen.Conv``,
``flax.linen.max_pool`` / ``avg_pool``) in tests/test_conv_math.py.

What deep learning calls "convolution" is cross-correlation: the kernel is not flipped,

  out[b, i, j, o] = sum_{p, q, c} x[b, S*i + p, S*j + q, c] * w[p, q, c, o],

with ``x`` zero-padded by ``P`` on each side. Layouts: activations NHWC ``[B, H, W, C]``,
kernels HWIO ``[KH, KW, Cin, Cout]``. Stride and padding are the same on both axes.
"""
import jax
import jax.numpy as jnp
import numpy as np

from cnnjax.errors import UserError


def conv_output_size(n: int, kernel: int, stride: int = 1, padding: int = 0) -> int:
  """Output length of a convolution along one axis: ``floor((N + 2P - F) / S) + 1``.

  Args:
    n: input length ``N``.
    kernel: kernel length ``F``.
    stride: step ``S`` between neighbouring windows.
    padding: zeros ``P`` added at each end.
  Returns:
    The number of window positions that fit in the padded input.
  Raises:
    UserError: non-positive ``n``, ``kernel`` or ``stride``, negative ``padding``, or a
      kernel longer than the padded input.
  """
  if n < 1:
    raise UserError(f"input size must be a positive integer, got {n}")
  if kernel < 1:
    raise UserError(f"kernel size must be a positive integer, got {kernel}")
  if stride < 1:
    raise UserError(f"stride must be a positive integer, got {stride}")
  if padding < 0:
    raise UserError(f"padding must be >= 0, got {padding}")
  if kernel > n + 2 * padding:
    raise UserError(f"kernel size {kernel} is larger than the padded input "
                    f"{n} + 2*{padding} = {n + 2 * padding}; expected kernel <= padded input")
  return (n + 2 * padding - kernel) // stride + 1


def pool_output_size(n: int, window: int, stride: int | None = None, padding: int = 0) -> int:
  """Output length of a pooling layer along one axis; ``stride`` defaults to ``window``.

  Pooling windows follow the same arithmetic as convolution kernels, so a model can chain
  ``conv_output_size`` and ``pool_output_size`` to infer its flatten size.
  """
  return conv_output_size(n, window, window if stride is None else stride, padding)


def _check_rank(name: str, array: np.ndarray | jax.Array, rank: int, layout: str) -> None:
  if np.ndim(array) != rank:
    raise UserError(f"{name} must have {rank} dimensions {layout}, got shape {np.shape(array)}")


def _windows(x: jax.Array, kh: int, kw: int, stride: int, padding: int,
             pad_value: float = 0.0) -> jax.Array:
  """Every ``[KH, KW]`` window of ``x [B, H, W, C]``, padded with ``pad_value``.

  Returns:
    ``[B, OH, OW, KH, KW, C]`` where ``[b, i, j, p, q, c] = x_pad[b, S*i + p, S*j + q, c]``.
  """
  _check_rank("input", x, 4, "[B, H, W, C]")
  _, h, w, _ = x.shape
  oh = conv_output_size(h, kh, stride, padding)
  ow = conv_output_size(w, kw, stride, padding)
  pad = ((0, 0), (padding, padding), (padding, padding), (0, 0))
  x = jnp.pad(x, pad, constant_values=pad_value)
  rows = stride * np.arange(oh)[:, None] + np.arange(kh)[None, :]  # [OH, KH]
  cols = stride * np.arange(ow)[:, None] + np.arange(kw)[None, :]  # [OW, KW]
  # Index arrays broadcast to [OH, OW, KH, KW]; batch and channel axes are kept.
  return x[:, rows[:, None, :, None], cols[None, :, None, :], :]


def _check_kernel(x: np.ndarray | jax.Array, w: np.ndarray | jax.Array) -> None:
  _check_rank("input", x, 4, "[B, H, W, Cin]")
  _check_rank("kernel", w, 4, "[KH, KW, Cin, Cout]")
  if x.shape[-1] != w.shape[2]:
    raise UserError(f"kernel input channels {w.shape[2]} (shape {w.shape}) do not match the "
                    f"input's {x.shape[-1]} channels (shape {x.shape})")


def conv2d_loops(x: np.ndarray, w: np.ndarray, stride: int = 1, padding: int = 0) -> np.ndarray:
  """Cross-correlation with explicit loops over output positions and channels (numpy).

  Slow and plain on purpose: one dot product of a window with one filter per output value
  (vectorised over the batch only).

  Args:
    x: input ``[B, H, W, Cin]``.
    w: kernel ``[KH, KW, Cin, Cout]``.
    stride: step between windows, on both axes.
    padding: zeros added on each side of both spatial axes.
  Returns:
    ``[B, OH, OW, Cout]`` with ``OH = conv_output_size(H, KH, stride, padding)``, same for W.
  """
  x, w = np.asarray(x), np.asarray(w)
  _check_kernel(x, w)
  b, h, wd, _ = x.shape
  kh, kw, _, cout = w.shape
  oh = conv_output_size(h, kh, stride, padding)
  ow = conv_output_size(wd, kw, stride, padding)
  x = np.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
  out = np.zeros((b, oh, ow, cout), np.result_type(x, w))
  for i in range(oh):
    for j in range(ow):
      window = x[:, i * stride:i * stride + kh, j * stride:j * stride + kw, :]  # [B, KH, KW, Cin]
      for o in range(cout):
        out[:, i, j, o] = np.sum(window * w[:, :, :, o], axis=(1, 2, 3))
  return out


def extract_patches(x: jax.Array, kh: int, kw: int, stride: int = 1,
                    padding: int = 0) -> jax.Array:
  """im2col: every ``[KH, KW]`` window of a zero-padded input, flattened.

  Args:
    x: input ``[B, H, W, C]``.
    kh, kw: window height and width.
    stride: step between windows, on both axes.
    padding: zeros added on each side of both spatial axes.
  Returns:
    ``[B, OH, OW, KH*KW*C]``, flattened in (KH, KW, C) order, the order of an HWIO kernel
    reshaped to ``[KH*KW*Cin, Cout]``.
  """
  windows = _windows(jnp.asarray(x), kh, kw, stride, padding)
  return windows.reshape(*windows.shape[:3], -1)


def conv2d_patches(x: jax.Array, w: jax.Array, stride: int = 1, padding: int = 0) -> jax.Array:
  """Cross-correlation as patch extraction then one matmul (differentiable, jittable).

  Args:
    x: input ``[B, H, W, Cin]``.
    w: kernel ``[KH, KW, Cin, Cout]``.
    stride: step between windows, on both axes.
    padding: zeros added on each side of both spatial axes.
  Returns:
    ``[B, OH, OW, Cout]``, equal to ``conv2d_loops(x, w, stride, padding)``.
  """
  x, w = jnp.asarray(x), jnp.asarray(w)
  _check_kernel(x, w)
  kh, kw, cin, cout = w.shape
  patches = extract_patches(x, kh, kw, stride, padding)  # [B, OH, OW, KH*KW*Cin]
  return patches @ w.reshape(kh * kw * cin, cout)


def max_pool2d(x: jax.Array, window: int, stride: int | None = None,
               padding: int = 0) -> jax.Array:
  """Max over each ``[window, window]`` window, per channel.

  Args:
    x: input ``[B, H, W, C]``.
    window: window side.
    stride: step between windows; defaults to ``window`` (as in PyTorch; flax's
      ``max_pool`` defaults to 1).
    padding: ``-inf`` added on each side, so padding never wins the max.
  Returns:
    ``[B, OH, OW, C]`` with ``OH = pool_output_size(H, window, stride, padding)``.
  """
  stride = window if stride is None else stride
  return _windows(jnp.asarray(x), window, window, stride, padding, -jnp.inf).max(axis=(3, 4))


def avg_pool2d(x: jax.Array, window: int, stride: int | None = None,
               padding: int = 0) -> jax.Array:
  """Mean over each ``[window, window]`` window, per channel.

  Args:
    x: input ``[B, H, W, C]``.
    window: window side.
    stride: step between windows; defaults to ``window``.
    padding: zeros added on each side; they count in the mean (flax's
      ``count_include_pad=True``).
  Returns:
    ``[B, OH, OW, C]`` with ``OH = pool_output_size(H, window, stride, padding)``.
  """
  stride = window if stride is None else stride
  return _windows(jnp.asarray(x), window, window, stride, padding).mean(axis=(3, 4))


def learn_kernel(image: np.ndarray, target: np.ndarray, kernel_shape: tuple[int, int] = (1, 2),
                 steps: int = 300, learning_rate: float = 0.5,
                 seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Recovers a kernel from an image and its filtered version by plain gradient descent.

  Minimises the mean squared error between ``conv2d_patches(image, kernel)`` (stride 1, no
  padding) and ``target``, from a small random kernel, with ``jax.grad`` in a Python loop.
  Use pixel values around [0, 1]: the stable learning rate shrinks as the scale grows.

  Args:
    image: greyscale image ``[H, W]``.
    target: filtered image ``[H - KH + 1, W - KW + 1]``.
    kernel_shape: ``(KH, KW)`` of the kernel to learn.
    steps: gradient steps.
    learning_rate: step size.
    seed: seed of the random initial kernel.
  Returns:
    ``(kernel [KH, KW], losses [steps])``, the loss measured before each step.
  """
  _check_rank("image", image, 2, "[H, W]")
  if steps < 1:
    raise UserError(f"steps must be a positive integer, got {steps}")
  if learning_rate <= 0:
    raise UserError(f"learning_rate must be > 0, got {learning_rate}")
  kh, kw = kernel_shape
  h, w = np.shape(image)
  expected = (conv_output_size(h, kh), conv_output_size(w, kw))
  if np.shape(target) != expected:
    raise UserError(f"target shape {np.shape(target)} does not match the output of a "
                    f"{kh}x{kw} kernel on a {h}x{w} image; expected {expected}")
  x = jnp.asarray(image, jnp.float32)[None, :, :, None]  # [1, H, W, 1]
  y = jnp.asarray(target, jnp.float32)

  def loss_fn(kernel: jax.Array) -> jax.Array:
    prediction = conv2d_patches(x, kernel[:, :, None, None])[0, :, :, 0]  # [OH, OW]
    return jnp.mean((prediction - y) ** 2)

  @jax.jit
  def step(kernel: jax.Array) -> tuple[jax.Array, jax.Array]:
    loss, grad = jax.value_and_grad(loss_fn)(kernel)
    return kernel - learning_rate * grad, loss

  kernel = 0.1 * jax.random.normal(jax.random.key(seed), (kh, kw))
  losses = []
  for _ in range(steps):
    kernel, loss = step(kernel)
    losses.append(loss)
  return np.asarray(kernel), np.asarray(jnp.stack(losses))


def box_blur(size: int) -> np.ndarray:
  """Mean filter: ``[size, size]`` of ``1 / size**2`` (sums to 1)."""
  if size < 1:
    raise UserError(f"box blur size must be a positive integer, got {size}")
  return np.full((size, size), 1.0 / size**2, np.float32)


def gaussian_kernel(size: int, sigma: float) -> np.ndarray:
  """Gaussian blur ``[size, size]``, centred, normalised to sum to 1.

  Args:
    size: kernel side; odd sizes have a single centre pixel.
    sigma: standard deviation in pixels.
  Returns:
    ``[size, size]`` float32, symmetric under transposition and flips.
  """
  if size < 1:
    raise UserError(f"gaussian kernel size must be a positive integer, got {size}")
  if not sigma > 0:
    raise UserError(f"gaussian sigma must be > 0, got {sigma}")
  d = np.arange(size) - (size - 1) / 2  # [size], distance from the centre
  g = np.exp(-(d[:, None]**2 + d[None, :]**2) / (2 * sigma**2))
  return (g / g.sum()).astype(np.float32)


def edge_kernel() -> np.ndarray:
  """8-neighbour Laplacian ``[3, 3]``: sums to 0, so flat regions map to 0 and edges stand out."""
  k = -np.ones((3, 3), np.float32)
  k[1, 1] = 8.0
  return k


def apply_kernel(image: np.ndarray, kernel: np.ndarray) -> np.ndarray:
  """Filters each channel of an image with one 2-D kernel, 'same' zero padding.

  Cross-correlation as everywhere in this module; for the symmetric kernels above it equals
  true convolution. An even kernel side ``K`` pads ``(K-1)//2`` before and ``K//2`` after.

  Args:
    image: greyscale ``[H, W]`` or multi-channel ``[H, W, C]``, any numeric dtype.
    kernel: ``[KH, KW]``.
  Returns:
    float32 array with the shape of ``image``.
  """
  if np.ndim(image) not in (2, 3):
    raise UserError(f"image must have shape [H, W] or [H, W, C], got {np.shape(image)}")
  _check_rank("kernel", kernel, 2, "[KH, KW]")
  x = jnp.asarray(image, jnp.float32)
  x = x[None, :, :, None] if x.ndim == 2 else x[None]  # [1, H, W, C]
  c = x.shape[-1]
  kh, kw = np.shape(kernel)
  # Depthwise: C groups of one channel each, all filtered by the same kernel.
  w = jnp.broadcast_to(jnp.asarray(kernel, jnp.float32)[:, :, None, None], (kh, kw, 1, c))
  out = jax.lax.conv_general_dilated(
      x, w, window_strides=(1, 1),
      padding=(((kh - 1) // 2, kh // 2), ((kw - 1) // 2, kw // 2)),
      dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=c,
      precision=jax.lax.Precision.HIGHEST)
  return np.asarray(out[0]).reshape(np.shape(image))
