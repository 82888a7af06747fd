"""oneDNN convolutions, batch normalisation and matrix products, and a max pooling, for
XLA:CPU, through ``jax.ffi`` with custom VJPs.

XLA:CPU's convolution kernels (Eigen) run up to 3.9x slower than oneDNN's, the library
PyTorch uses on CPU (``python -m benchmarks --mode=convs``), and its reductions over
``[B, H, W]`` per channel (batch-norm statistics and their gradients) take 3x an elementwise
pass over the same tensor (BENCHMARKS.md notes). ``conv(x, kernel, strides, padding)`` runs
a float32 or bfloat16 NHWC/HWIO 2-D convolution (grouped too: depthwise), its input gradient
and its kernel gradient as oneDNN primitives; ``batch_norm(x, scale, shift, epsilon)`` the
training-mode batch normalisation and its gradient (``cnnjax/csrc/onednn.cc``);
``batch_norm_inference(x, mean, var, scale, shift, epsilon, relu)`` the inference-mode
one, with an optional ReLU in the same pass; ``matmul(x, kernel)`` a dense layer's product
and its gradients (``cnnjax.models.dense``: bfloat16 only, which XLA:CPU computes in
float32). Where AMX runs bfloat16, an ungrouped kernel
gradient on an output map of at most 4x4 is one matrix product of the input's patches and
``dy`` instead (oneDNN's backward-weights convolution is slow there;
``CNNJAX_ONEDNN_WEIGHTS_MATMUL=1`` or ``=0`` forces the choice). ``max_pool(x, window)`` is
the extension's own OpenMP loop (compiled for AVX-512 too: ``cnnjax/csrc/max_pool.h``;
``CNNJAX_ONEDNN_POOL_LOOPS=any_x86`` forces the copy for CPUs without it), not
oneDNN's (whose gradient goes to one maximum of a tie):
``cnnjax.models.blocks.max_pool``'s values and gradient in one pass each way, where XLA
materialises the window's views in the forward pass and runs bfloat16 at half the speed of
float32 in the backward pass; ``window_max_pool(x, window, stride, padding)`` the same loop
for overlapping padded windows with ``flax.linen.max_pool``'s values and gradient (XLA:CPU's
bfloat16 ``reduce_window`` is several times slower than its float32 one). All are called
from jitted code like any other op; oneDNN's errors (a shape it has no kernel for) are
raised as JAX runtime errors.

The extension is optional. It needs oneDNN's library and headers (the PyPI packages
``onednn-cpu-gomp`` and ``onednn-devel-cpu-gomp``, installed with cnnjax on x86-64 Linux)
and a C++ compiler (``$CXX``, default g++), and is compiled on first use (~10 s) into
``$CNNJAX_CACHE`` (default ``~/.cache/cnnjax``), keyed by the sources, compiler, flags, jax
and oneDNN (``_target``), when ``cnnjax.runtime.configure()`` asks for it. ``available()`` says whether it can run here, ``unavailable_reason()`` why
not; ``CNNJAX_ONEDNN=0`` turns it off. ``cnnjax.models.conv`` (and EfficientNet-Lite's
``DepthwiseConv``), ``cnnjax.models.batch_norm``, ``cnnjax.models.dense`` and
``cnnjax.models.blocks``' ``pool`` and ``window_max_pool`` use it where ``configure`` chose
it (one device); without it they run XLA's own kernels, with the same results up to float32 rounding (max pooling: the same
values and gradient; the fused ReLU: 0 for a NaN). Its ops have custom VJPs: ``jax.grad``
works through them, forward-mode ``jax.jvp`` does not (``runtime.configure(onednn=False)``
for that).
"""
import ctypes
import functools
import hashlib
import os
import pathlib
import shutil
import subprocess
from importlib import metadata
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.custom_derivatives import SymbolicZero

from cnnjax import conv_math, runtime

_SOURCE = pathlib.Path(__file__).parent / "csrc" / "onednn.cc"
_TARGETS = {"conv_fwd": "CnnjaxOnednnConvFwd", "conv_bwd_data": "CnnjaxOnednnConvBwdData",
            "conv_bwd_weights": "CnnjaxOnednnConvBwdWeights",
            "conv_fwd_bias": "CnnjaxOnednnConvFwdBias",
            "conv_fwd_bias_relu": "CnnjaxOnednnConvFwdBiasRelu",
            "conv_fwd_bias_relu6": "CnnjaxOnednnConvFwdBiasRelu6",
            "conv_bwd_weights_bias": "CnnjaxOnednnConvBwdWeightsBias",
            "norm_fwd": "CnnjaxOnednnNormFwd", "norm_bwd": "CnnjaxOnednnNormBwd",
            "norm_infer": "CnnjaxOnednnNormInfer",
            "max_pool_fwd": "CnnjaxOnednnMaxPoolFwd", "max_pool_bwd": "CnnjaxOnednnMaxPoolBwd",
            "max_pool_bwd_first": "CnnjaxOnednnMaxPoolBwdFirst", "matmul": "CnnjaxOnednnMatmul"}


def _installed_file(distribution: str, name: str) -> pathlib.Path:
  """Where the installed ``distribution`` put its file ``name`` (e.g. into ``sys.prefix``)."""
  for file in metadata.files(distribution) or []:
    if file.name == name:
      return pathlib.Path(file.locate()).resolve()
  raise RuntimeError(f"{distribution} has no file {name}; reinstall it")


_FLAGS = ("-O2", "-std=c++17", "-shared", "-fPIC", "-fopenmp", "-w")  # any x86-64 CPU


def _target(compiler: str, library: pathlib.Path) -> pathlib.Path:
  """Where the build for this source, compiler, flags, jax and oneDNN goes."""
  sources = b"".join(path.read_bytes() for path in (_SOURCE, _SOURCE.with_name("max_pool.h")))
  key = hashlib.sha256(sources + f"{jax.__version__} {library} "
                       f"{metadata.version('onednn-cpu-gomp')} {compiler} "
                       f"{_FLAGS}".encode()).hexdigest()[:16]
  return runtime.cache_dir() / f"onednn_{key}.so"


def _build() -> pathlib.Path:
  """Compiles the extension (once per ``_target``); its path."""
  header = _installed_file("onednn-devel-cpu-gomp", "dnnl.hpp")  # PackageNotFoundError
  library = _installed_file("onednn-cpu-gomp", "libdnnl.so.3")
  compiler = os.environ.get("CXX", "g++")
  if shutil.which(compiler) is None:
    raise RuntimeError(f"no C++ compiler {compiler!r} on PATH (set CXX)")
  target = _target(compiler, library)
  if target.exists():
    return target
  target.parent.mkdir(parents=True, exist_ok=True)
  partial = target.with_suffix(f".{os.getpid()}.tmp")
  command = [compiler, *_FLAGS, f"-I{jax.ffi.include_dir()}", f"-I{header.parent}",
             str(_SOURCE), str(library), f"-Wl,-rpath,{library.parent}", "-o", str(partial)]
  done = subprocess.run(command, capture_output=True, text=True)
  if done.returncode != 0:
    raise RuntimeError(f"compiling {_SOURCE.name} failed: {done.stderr.strip()[-2000:]}")
  os.replace(partial, target)  # atomic: concurrent first uses each build, one file wins
  return target


@functools.cache
def _load() -> str:
  """Builds, loads and registers the FFI targets; '' on success, else why it cannot run."""
  if os.environ.get("CNNJAX_ONEDNN", "1") == "0":
    return "turned off by CNNJAX_ONEDNN=0"
  if jax.default_backend() != "cpu":
    return f"the default backend is {jax.default_backend()}, not cpu"
  try:
    library = ctypes.cdll.LoadLibrary(str(_build()))
  except (metadata.PackageNotFoundError, RuntimeError, OSError) as e:
    return f"{type(e).__name__}: {e}"
  for name, symbol in _TARGETS.items():
    jax.ffi.register_ffi_target(f"cnnjax_onednn_{name}",
                                jax.ffi.pycapsule(getattr(library, symbol)), platform="cpu")
  return ""


def available() -> bool:
  """Whether oneDNN convolutions can run here (built and loaded on the first call)."""
  return not _load()


def unavailable_reason() -> str:
  """Why ``available()`` is False ('' when it is True)."""
  return _load()


def _call(name: str, outs: Sequence[tuple[Sequence[int], jnp.dtype]], *operands: jax.Array,
          **attributes) -> list[jax.Array]:
  """The results ``outs`` (shape, dtype) of the oneDNN FFI target ``cnnjax_onednn_{name}``."""
  if reason := _load():
    raise RuntimeError(f"oneDNN kernels are unavailable: {reason}")
  return jax.ffi.ffi_call(
      f"cnnjax_onednn_{name}",
      [jax.ShapeDtypeStruct(tuple(shape), dtype) for shape, dtype in outs],
      vmap_method="sequential")(
      *operands, **attributes)


def _attributes(strides, padding) -> dict[str, np.ndarray]:
  return {"strides": np.asarray(strides, np.int64),
          "padding": np.asarray([p for pair in padding for p in pair], np.int64)}


def _conv_call(name, out_shape, a, b, strides, padding) -> jax.Array:
  return _call(f"conv_{name}", [(out_shape, a.dtype)], a, b, **_attributes(strides, padding))[0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv(x: jax.Array, kernel: jax.Array, strides: tuple[int, int],
         padding: tuple[tuple[int, int], tuple[int, int]]) -> jax.Array:
  """``[B, H, W, Cin]`` conv ``[kh, kw, Cin / G, Cout]`` -> ``[B, Ho, Wo, Cout]`` (all float32
  or all bfloat16), ``lax.conv_general_dilated``'s NHWC/HWIO result with explicit ``padding``
  pairs and ``feature_group_count=G`` (``G = Cin // kernel.shape[2]``; depthwise: ``[kh, kw,
  1, Cin]``)."""
  kh, kw, _, cout = kernel.shape
  ho = conv_math.conv_output_size(x.shape[1] + sum(padding[0]), kh, strides[0])
  wo = conv_math.conv_output_size(x.shape[2] + sum(padding[1]), kw, strides[1])
  return _conv_call("fwd", (x.shape[0], ho, wo, cout), x, kernel, strides, padding)


def _conv_fwd(x, kernel, strides, padding):
  return conv(x, kernel, strides, padding), (x, kernel)


def _conv_bwd(strides, padding, residuals, dy):
  x, kernel = residuals
  return (_conv_call("bwd_data", x.shape, dy, kernel, strides, padding),
          _conv_call("bwd_weights", kernel.shape, x, dy, strides, padding))


conv.defvjp(_conv_fwd, _conv_bwd)


def _product(a: jax.Array, b: jax.Array, transpose_a: bool = False,
             transpose_b: bool = False) -> jax.Array:
  m = a.shape[1] if transpose_a else a.shape[0]
  n = b.shape[0] if transpose_b else b.shape[1]
  return _call("matmul", [((m, n), a.dtype)], a, b, transpose_a=np.int64(transpose_a),
               transpose_b=np.int64(transpose_b))[0]


@jax.custom_vjp
def matmul(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """``x [M, K] @ kernel [K, N]`` (both float32 or both bfloat16) on oneDNN's kernels (AMX or
  AVX-512 BF16 for bfloat16; XLA:CPU computes a bfloat16 product in float32), accumulated in
  float32 and rounded once into their dtype, as are its two gradients (``dy kernel^T``,
  ``x^T dy``)."""
  if (x.ndim != 2 or kernel.ndim != 2 or x.shape[1] != kernel.shape[0]
      or x.dtype != kernel.dtype or x.dtype not in (jnp.float32, jnp.bfloat16)):
    raise ValueError(f"matmul of {x.dtype}{list(x.shape)} and {kernel.dtype}"
                     f"{list(kernel.shape)}; expected [M, K] and [K, N] matrices, both float32 "
                     "or both bfloat16")
  return _product(x, kernel)


def _matmul_fwd(x, kernel):
  return matmul(x, kernel), (x, kernel)


def _matmul_bwd(residuals, dy):
  x, kernel = residuals
  return _product(dy, kernel, transpose_b=True), _product(x, dy, transpose_a=True)


matmul.defvjp(_matmul_fwd, _matmul_bwd)


# conv_bias's activations: its FFI target and the gradient's mask, from the output.
_CONV_ACTIVATIONS = {None: ("conv_fwd_bias", None),
                     "relu": ("conv_fwd_bias_relu", lambda y: y > 0),
                     "relu6": ("conv_fwd_bias_relu6", lambda y: (y > 0) & (y < 6))}


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def conv_bias(x: jax.Array, kernel: jax.Array, bias: jax.Array, strides: tuple[int, int],
              padding: tuple[tuple[int, int], tuple[int, int]],
              activation: str | None = None) -> jax.Array:
  """``conv(x, kernel, strides, padding) + bias``, the bias ``[Cout]`` (float32) added inside
  oneDNN's convolution, and its gradient computed in the backward-weights pass (XLA sums a
  bfloat16 activation gradient over ``[B, Ho, Wo]`` slowly: BENCHMARKS.md); ``activation``
  'relu' or 'relu6': then ``nn.relu`` / ``nn.relu6`` of that as the kernel's post-op (one
  pass over the output fewer; a NaN comes out as 0 where flax's would keep it, and NaN
  weights still reach the loss through the layers after)."""
  kh, kw, _, cout = kernel.shape
  ho = conv_math.conv_output_size(x.shape[1] + sum(padding[0]), kh, strides[0])
  wo = conv_math.conv_output_size(x.shape[2] + sum(padding[1]), kw, strides[1])
  return _call(_CONV_ACTIVATIONS[activation][0], [((x.shape[0], ho, wo, cout), x.dtype)],
               x, kernel, bias, **_attributes(strides, padding))[0]


def _conv_bias_fwd(x, kernel, bias, strides, padding, activation):
  y = conv_bias(x, kernel, bias, strides, padding, activation)
  return y, (x, kernel, y if activation else None)


def _conv_bias_bwd(strides, padding, activation, residuals, dy):
  x, kernel, y = residuals
  if activation:  # the activation's gradient, from its output (as jax.nn.relu's, relu6's)
    dy = jnp.where(_CONV_ACTIVATIONS[activation][1](y), dy, jnp.zeros_like(dy))
  dw, dbias = _call("conv_bwd_weights_bias", [(kernel.shape, x.dtype), ((kernel.shape[3],),
                                                                       jnp.float32)],
                    x, dy, **_attributes(strides, padding))
  return _conv_call("bwd_data", x.shape, dy, kernel, strides, padding), dw, dbias


conv_bias.defvjp(_conv_bias_fwd, _conv_bias_bwd)


def _check_channels(x: jax.Array, *per_channel: jax.Array) -> None:
  """The kernels read ``x.shape[-1]`` values of each per-channel operand, and normalise at
  least one value per channel: refuse others."""
  if x.ndim == 0 or x.size == 0:
    raise ValueError(f"batch norm of x {x.shape}; expected at least one channel and one row")
  if any(a.shape != x.shape[-1:] for a in per_channel):
    raise ValueError(f"batch norm of x {x.shape} with per-channel operands of shapes "
                     f"{[a.shape for a in per_channel]}; expected ({x.shape[-1]},) each")


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def batch_norm(x: jax.Array, scale: jax.Array, shift: jax.Array,
               epsilon: float) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Training-mode batch normalisation of ``x [..., C]`` (float32 or bfloat16) over all axes
  but the last: ``(y [..., C], mean [C], var [C])`` with the batch's biased variance and
  ``y = (x - mean) / sqrt(var + epsilon) * scale + shift``; ``y`` in ``x``'s dtype, the
  float32 ``scale``, ``shift``, ``mean`` and ``var`` (statistics accumulated in float32)."""
  _check_channels(x, scale, shift)
  c, f32 = x.shape[-1], jnp.float32
  return tuple(_call("norm_fwd", [(x.shape, x.dtype), ((c,), f32), ((c,), f32)], x, scale,
                     shift, epsilon=np.float32(epsilon)))


def _norm_fwd(x, scale, shift, epsilon):
  y, mean, var = batch_norm(x.value, scale.value, shift.value, epsilon)
  return (y, mean, var), (x.value, scale.value, mean, var)


def _norm_bwd(epsilon, residuals, cotangents):
  x, scale, mean, var = residuals
  dy, dmean, dvar = cotangents
  if isinstance(dy, SymbolicZero):
    dy = jnp.zeros_like(x)
  dx, dscale, dshift = _call("norm_bwd", [(x.shape, x.dtype), (scale.shape, jnp.float32),
                                         (scale.shape, jnp.float32)],
                             x, dy.astype(x.dtype), scale, mean, var, epsilon=np.float32(epsilon))
  rows = x.size // x.shape[-1]
  if not isinstance(dmean, SymbolicZero):  # mean and var are rarely differentiated
    dx = dx + (dmean / rows).astype(dx.dtype)
  if not isinstance(dvar, SymbolicZero):
    dx = dx + (dvar * 2.0 * (x - mean) / rows).astype(dx.dtype)
  return dx, dscale, dshift


batch_norm.defvjp(_norm_fwd, _norm_bwd, symbolic_zeros=True)


def _normalized(x, mean, var, scale, shift, epsilon, relu=False):
  """``batch_norm_inference``'s value in XLA's ops (flax's formula), for its gradient."""
  y = (x.astype(jnp.float32) - mean) * (lax.rsqrt(var + epsilon) * scale) + shift
  return (jax.nn.relu(y) if relu else y).astype(x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def batch_norm_inference(x: jax.Array, mean: jax.Array, var: jax.Array, scale: jax.Array,
                         shift: jax.Array, epsilon: float, relu: bool = False) -> jax.Array:
  """Inference-mode batch normalisation of ``x [..., C]`` (float32 or bfloat16) with the given
  float32 ``mean``, ``var``, ``scale`` and ``shift`` ``[C]``: ``y = (x - mean) / sqrt(var +
  epsilon) * scale + shift`` in ``x``'s dtype, ``relu``: and ``max(y, 0)``, in one oneDNN
  pass (``cnnjax.models.BatchNorm`` uses it on bfloat16 inputs). Its gradient (saliency, CAM
  through an evaluated model) is XLA's of that formula."""
  _check_channels(x, mean, var, scale, shift)
  return _call("norm_infer", [(x.shape, x.dtype)], x, mean, var, scale, shift,
               epsilon=np.float32(epsilon), relu=np.int64(relu))[0]


def _norm_infer_fwd(x, mean, var, scale, shift, epsilon, relu):
  return (batch_norm_inference(x, mean, var, scale, shift, epsilon, relu),
          (x, mean, var, scale, shift))


def _norm_infer_bwd(epsilon, relu, residuals, dy):
  return jax.vjp(functools.partial(_normalized, epsilon=epsilon, relu=relu), *residuals)[1](dy)


batch_norm_inference.defvjp(_norm_infer_fwd, _norm_infer_bwd)


def _pool_attributes(window, stride, padding) -> dict[str, np.ndarray]:
  return {"window": np.int64(window), "stride": np.int64(stride),
          "padding": np.asarray([p for pair in padding for p in pair], np.int64)}


def _pooled(x, window, stride, padding) -> jax.Array:
  """``x [B, H, W, C]``'s maxima over ``window x window`` windows, ``[B, Ho, Wo, C]``."""
  b, h, w, c = x.shape
  ho, wo = (max((n + sum(pads) - window) // stride + 1, 0)
            for n, pads in ((h, padding[0]), (w, padding[1])))
  return _call("max_pool_fwd", [((b, ho, wo, c), x.dtype)], x,
               **_pool_attributes(window, stride, padding))[0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def max_pool(x: jax.Array, window: int) -> jax.Array:
  """``[B, H, W, C]`` -> ``[B, H // window, W // window, C]`` (float32 or bfloat16): the
  maximum of each non-overlapping window, with ``cnnjax.models.blocks.max_pool``'s values and
  gradient (shared among ties), in one OpenMP pass each way."""
  return _pooled(x, window, window, ((0, 0), (0, 0)))


def _max_pool_fwd(x, window):
  y = max_pool(x, window)
  return y, (x, y)


def _max_pool_bwd(window, residuals, dy):
  x, y = residuals
  return (_call("max_pool_bwd", [(x.shape, x.dtype)], x, y, dy.astype(x.dtype),
                **_pool_attributes(window, window, ((0, 0), (0, 0))))[0],)


max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def window_max_pool(x: jax.Array, window: int, stride: int,
                    padding: tuple[tuple[int, int], tuple[int, int]]) -> jax.Array:
  """``[B, H, W, C]`` -> ``[B, Ho, Wo, C]`` (float32 or bfloat16): ``flax.linen.max_pool(x,
  (window, window), (stride, stride), padding)``'s values (padded with -inf) and gradient
  (``lax.reduce_window``'s: all of a window's to its first maximum, summed where windows
  overlap; in bfloat16 summed in float32 and rounded once, where XLA rounds each addition),
  in one OpenMP pass each way."""
  return _pooled(x, window, stride, padding)


def _window_max_pool_fwd(x, window, stride, padding):
  y = window_max_pool(x, window, stride, padding)
  return y, (x, y)


def _window_max_pool_bwd(window, stride, padding, residuals, dy):
  x, y = residuals
  return (_call("max_pool_bwd_first", [(x.shape, x.dtype)], x, y, dy.astype(x.dtype),
                **_pool_attributes(window, stride, padding))[0],)


window_max_pool.defvjp(_window_max_pool_fwd, _window_max_pool_bwd)
