"""``Conv``: flax's ``nn.Conv`` (same parameters, names and numerics) with the convolution
lowered per shape to what runs fastest on CPU.

oneDNN's convolutions (the kernels PyTorch uses on CPU) run 1.0-3.9x faster than XLA:CPU's
(Eigen) on the cnnjax models' layers, forward and both gradients, and XLA's fall far behind
a matrix product on maps of <= 4 output pixels (ResNet's last stages at 32x32 input: 9-30x)
and on strided 1x1 kernels (1.3-1.7x) (``python -m benchmarks --mode=convs``,
BENCHMARKS.md "Convolution lowering"). So ``lowering`` picks, for a float32 (or bfloat16:
``config.precision``) NHWC/HWIO convolution without dilation (grouped: see below):

- ``"onednn"``: ``cnnjax.onednn.conv`` (oneDNN primitives through ``jax.ffi``, custom VJP)
  whenever that extension is available (installed with cnnjax on x86-64 Linux, see
  ``cnnjax.onednn``) and the computation runs on one device (bfloat16 only on CPUs with bf16
  instructions, ``runtime.onednn_in_use``): it wins on every layer of the
  cnnjax models but one (ResNet's 8x8 -> 4x4 3x3/2 at 32x32: 0.93x) and is within ~2 ms of
  im2col on the tiny maps (faster on one, slower on two).
  With the batch sharded over several devices XLA would gather it for the custom call, so
  there the choices below apply.
- ``"im2col"``: otherwise, on maps of <= 4 output pixels and strided 1x1 kernels: the
  ``kh * kw`` shifted (strided) slices of the padded input concatenated on channels,
  ``[B, Ho, Wo, kh * kw * Cin]``, times the kernel reshaped ``[kh * kw * Cin, Cout]``; its
  gradients are products too (plus slice/pad adds). im2col also wins on narrow contractions
  (``kh * kw * Cin <= 150``) in isolation, but not in whole train steps (first layers need no
  input gradient; SeedCNN's step ran 1.8x slower), so those stay with XLA.
- ``"xla"``: every other convolution, and any dilated, mixed-dtype or non-NHWC one:
  ``lax.conv_general_dilated``.

Grouped convolutions (``feature_group_count``; depthwise) run on oneDNN where ``"onednn"``
applies, else on lax's.

``tests/test_conv.py`` checks values and gradients of each lowering against lax's.
"""
import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from cnnjax import conv_math, onednn, runtime
from cnnjax.models.batch_norm import ACTIVATIONS

SMALL_MAP_PIXELS = 4  # output pixels at or below which im2col wins at any width


def lowering(x_shape: Sequence[int], kernel_shape: Sequence[int], strides: Sequence[int],
             padding: Sequence[tuple[int, int]], dtype: str = "float32") -> str:
  """How the ``[B, H, W, Cin]`` by ``[kh, kw, Cin, Cout]`` convolution runs here:
  ``"onednn"``, ``"im2col"`` or ``"xla"`` (see the module docstring)."""
  if runtime.onednn_in_use(dtype):
    return "onednn"
  kh, kw = kernel_shape[:2]
  ho = conv_math.conv_output_size(x_shape[1] + sum(padding[0]), kh, strides[0])
  wo = conv_math.conv_output_size(x_shape[2] + sum(padding[1]), kw, strides[1])
  if (kh * kw == 1 and max(strides) > 1) or ho * wo <= SMALL_MAP_PIXELS:
    return "im2col"
  return "xla"


def im2col_conv(x: jax.Array, kernel: jax.Array, strides: Sequence[int],
                padding: Sequence[tuple[int, int]]) -> jax.Array:
  """``[B, H, W, Cin]`` conv ``[kh, kw, Cin, Cout]`` -> ``[B, Ho, Wo, Cout]`` as one product."""
  kh, kw, cin, cout = kernel.shape
  x = jnp.pad(x, ((0, 0), tuple(padding[0]), tuple(padding[1]), (0, 0)))
  ho = (x.shape[1] - kh) // strides[0] + 1
  wo = (x.shape[2] - kw) // strides[1] + 1
  slices = [x[:, i:i + (ho - 1) * strides[0] + 1:strides[0],
              j:j + (wo - 1) * strides[1] + 1:strides[1], :]
            for i in range(kh) for j in range(kw)]
  patches = slices[0] if len(slices) == 1 else jnp.concatenate(slices, axis=-1)
  return jnp.einsum("bhwk,ko->bhwo", patches, kernel.reshape(kh * kw * cin, cout))


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                         rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
                         precision=None, **kwargs):
  """``lax.conv_general_dilated``'s signature; NHWC/HWIO 2-D convolutions without dilation,
  both operands float32 or both bfloat16, run as ``lowering`` picks (grouped ones on oneDNN
  only), all others as lax's."""
  plain = functools.partial(
      lax.conv_general_dilated, lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
      rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
      feature_group_count=feature_group_count, precision=precision, **kwargs)
  if (lhs.ndim != 4 or kwargs or precision is not None
      or lhs.shape[-1] != feature_group_count * rhs.shape[-2]  # lax says what is wrong
      or rhs.shape[-1] % feature_group_count
      or lhs.dtype not in (jnp.float32, jnp.bfloat16) or rhs.dtype != lhs.dtype
      or any(d != 1 for d in (lhs_dilation or (1, 1)) + (rhs_dilation or (1, 1)))
      or lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
      != lax.conv_dimension_numbers(lhs.shape, rhs.shape, ("NHWC", "HWIO", "NHWC"))):
    return plain()
  if isinstance(padding, str):
    padding = lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], window_strides, padding)
  strides, padding = tuple(window_strides), tuple(tuple(p) for p in padding)
  how = lowering(lhs.shape, rhs.shape, strides, padding, lhs.dtype.name)
  if how == "onednn":
    return onednn.conv(lhs, rhs, strides, padding)
  if feature_group_count != 1:
    return plain()
  if how == "im2col":
    return im2col_conv(lhs, rhs, strides, padding)
  return plain()


class Conv(nn.Conv):
  """``nn.Conv`` (fields, parameter names, initialisation and results) with the lowering
  above; where a 2-D NHWC convolution with a bias runs on oneDNN, the bias is added inside
  oneDNN's kernel (``onednn.conv_bias``), whose backward pass also gives the bias gradient.
  ``relu=True`` returns ``nn.relu`` of the result (as Keras's ``activation='relu'``: the
  layer's output, e.g. for ``cnnjax.interpret``, is the ReLU's), inside that kernel where it
  runs there (a NaN then comes out as 0). Input ``[B, H, W, Cin]``, output
  ``[B, Ho, Wo, features]``. ``fold`` computes it with a batch norm folded in
  (``batch_norm.conv_norm``)."""
  conv_general_dilated: Any = conv_general_dilated
  relu: bool = False

  @nn.compact
  def __call__(self, inputs: jax.Array) -> jax.Array:
    fused = self._fused_bias_form(inputs)
    if fused is None:
      y = super().__call__(inputs)
      return nn.relu(y) if self.relu else y
    kernel_size, strides, padding = fused
    kernel = self.param("kernel", self.kernel_init, (*kernel_size, inputs.shape[-1], self.features),
                        self.param_dtype)
    bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype)
    inputs, kernel, bias = self.promote_dtype(inputs, kernel, bias, dtype=self.dtype)
    return onednn.conv_bias(inputs, kernel, bias.astype(jnp.float32), strides, padding,
                            "relu" if self.relu else None)

  def fold(self, inputs: jax.Array, scale: jax.Array, shift: jax.Array,
           activation: str | None = None) -> jax.Array:
    """``activation(self(inputs) * scale + shift)``, ``scale`` and ``shift`` ``[features]``
    float32 (an inference-mode batch norm), as one convolution: the kernel times ``scale``,
    the bias ``bias * scale + shift``, the activation (None, 'relu', 'relu6') inside oneDNN's
    kernel where it runs there. Only where ``_folds(inputs)``; the parameters must exist."""
    _, strides, padding = self._geometry(inputs)
    params = self.variables["params"]
    if self.use_bias:
      shift = shift + params["bias"].astype(jnp.float32) * scale
    return scaled(inputs, params["kernel"], scale, shift, strides, padding, activation,
                  dtype=self.dtype)

  def _folds(self, inputs: jax.Array) -> bool:
    """Whether ``fold`` can take this call: a plain 2-D convolution without its own ReLU."""
    return not self.relu and self._geometry(inputs) is not None

  def _geometry(self, inputs: jax.Array):
    """``(kernel_size, strides, padding pairs)`` of a plain 2-D NHWC convolution computing in
    float32 or bfloat16 (no mask, groups, dilation or precision), else None."""
    if (inputs.ndim != 4 or not isinstance(self.kernel_size, Sequence)
        or len(self.kernel_size) != 2 or self.mask is not None or not self.shared_weights
        or self.feature_group_count != 1 or self.precision is not None
        or self.input_dilation not in (None, 1, (1, 1))
        or self.kernel_dilation not in (None, 1, (1, 1))):
      return None
    if jnp.dtype(self.dtype or inputs.dtype) not in (jnp.float32, jnp.bfloat16):
      return None
    kernel_size = tuple(self.kernel_size)
    strides = (self.strides,) * 2 if isinstance(self.strides, int) else tuple(self.strides or (1, 1))
    padding = nn.linear.canonicalize_padding(self.padding, 2)
    if isinstance(padding, str):
      if padding not in ("SAME", "VALID"):
        return None
      padding = lax.padtype_to_pads(inputs.shape[1:3], kernel_size, strides, padding)
    return kernel_size, strides, tuple(tuple(p) for p in padding)

  def _fused_bias_form(self, inputs: jax.Array):
    """``_geometry`` when this call's bias can go into oneDNN's kernel, else None (flax's
    own code runs)."""
    geometry = self._geometry(inputs)
    if geometry is None or not self.use_bias or self.is_initializing():
      return None
    kernel_size, strides, padding = geometry
    kernel_shape = (*kernel_size, inputs.shape[-1], self.features)
    dtype = jnp.dtype(self.dtype or inputs.dtype).name
    if lowering(inputs.shape, kernel_shape, strides, padding, dtype) != "onednn":
      return None
    return geometry


def scaled(x: jax.Array, kernel: jax.Array, scale: jax.Array, shift: jax.Array,
           strides: tuple[int, int], padding: tuple[tuple[int, int], tuple[int, int]],
           activation: str | None = None,
           convolve: Callable[[jax.Array, jax.Array], jax.Array] | None = None,
           dtype: Any = None) -> jax.Array:
  """``activation(conv(x, kernel * scale) + shift)``: ``x [B, H, W, Cin]``, ``kernel [kh, kw,
  Cin / G, Cout]``, ``scale`` and ``shift`` ``[Cout]`` float32, ``activation`` None, 'relu'
  or 'relu6'; the kernel scaled in float32 and rounded once to ``dtype`` (default: ``x``'s
  and ``kernel``'s promoted). One oneDNN kernel (``onednn.conv_bias``) where ``lowering``
  picks oneDNN; else ``convolve(x, kernel)`` (default ``conv_general_dilated``), then the
  shift and activation."""
  dtype = jnp.dtype(dtype or jnp.result_type(x, kernel))
  x, kernel = x.astype(dtype), (kernel.astype(jnp.float32) * scale).astype(dtype)
  if lowering(x.shape, kernel.shape, strides, padding, x.dtype.name) == "onednn":
    return onednn.conv_bias(x, kernel, shift, strides, padding, activation)
  if convolve is None:
    y = conv_general_dilated(x, kernel, strides, padding, dimension_numbers=("NHWC", "HWIO", "NHWC"),
                             feature_group_count=x.shape[-1] // kernel.shape[2])
  else:
    y = convolve(x, kernel)
  return ACTIVATIONS[activation](y + shift.astype(y.dtype))
