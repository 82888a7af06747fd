"""``Conv``: flax's ``nn.Conv`` (same parameters, names and numerics) with the convolution
lowered per shape to what XLA:CPU runs fastest.

XLA:CPU's convolution kernels are good on mid-sized maps with many input channels but fall
far behind a matrix product on strided 1x1 kernels (ResNet's downsampling shortcuts: 1.4-1.7x)
and on maps of <= 4 output pixels (ResNet's last stages at 32x32 input: 2x at 1x1, 11-16x at
2x2), forward and both gradients (``python -m experiments.bench --convs``, BENCHMARKS.md
"Convolution lowering"); unstrided 1x1 kernels are as fast or faster in XLA. There
``conv_general_dilated`` runs im2col: the ``kh * kw`` shifted (strided) slices of the padded
input concatenated on channels, ``[B, Ho, Wo, kh * kw * Cin]``, times the kernel reshaped
``[kh * kw * Cin, Cout]``; its gradients are products too (plus slice/pad adds). Every other
convolution, and any grouped, dilated or non-NHWC one, goes to ``lax.conv_general_dilated``:
im2col also wins on narrow contractions (``kh * kw * Cin <= 150``) in isolation, but not in
whole train steps (first layers need no input gradient; SeedCNN's step ran 1.8x slower), so
those stay with XLA. ``tests/test_conv.py`` checks values and gradients against lax.
"""
import functools
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

SMALL_MAP_PIXELS = 4  # output pixels at or below which im2col wins at any width


def uses_im2col(x_shape: Sequence[int], kernel_shape: Sequence[int],
                strides: Sequence[int], padding: Sequence[tuple[int, int]]) -> bool:
  """Whether the ``[B, H, W, Cin]`` by ``[kh, kw, Cin, Cout]`` convolution runs as im2col."""
  kh, kw = kernel_shape[:2]
  ho = (x_shape[1] + sum(padding[0]) - kh) // strides[0] + 1
  wo = (x_shape[2] + sum(padding[1]) - kw) // strides[1] + 1
  return (kh * kw == 1 and max(strides) > 1) or ho * wo <= SMALL_MAP_PIXELS


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
  """``lax.conv_general_dilated``'s signature; NHWC/HWIO 2-D convolutions without groups or
  dilation that ``uses_im2col`` picks run as ``im2col_conv``, all others as lax's."""
  plain = functools.partial(
      lax.conv_general_dilated, lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
      rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
      feature_group_count=feature_group_count, precision=precision, **kwargs)
  if (lhs.ndim != 4 or feature_group_count != 1 or kwargs or precision is not None
      or any(d != 1 for d in (lhs_dilation or (1, 1)) + (rhs_dilation or (1, 1)))
      or lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
      != lax.conv_dimension_numbers(lhs.shape, rhs.shape, ("NHWC", "HWIO", "NHWC"))):
    return plain()
  if isinstance(padding, str):
    padding = lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], window_strides, padding)
  if not uses_im2col(lhs.shape, rhs.shape, window_strides, padding):
    return plain()
  return im2col_conv(lhs, rhs, window_strides, padding)


# nn.Conv itself (class, parameter names, initialisation), with the lowering above.
Conv = functools.partial(nn.Conv, conv_general_dilated=conv_general_dilated)
