"""``Dense``: flax's ``nn.Dense`` (fields, parameter names, initialisation and results) whose
bfloat16 product runs on oneDNN where ``runtime.onednn_in_use('bfloat16')`` and it has at
least ``ONEDNN_MIN_MACS`` multiply-adds (``cnnjax.onednn.matmul``: AMX's or AVX-512 BF16's
kernels): XLA:CPU computes a bfloat16 product in float32, several times slower
(BENCHMARKS.md notes). Everything else is ``nn.Dense``'s own ``lax.dot_general``."""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from cnnjax import onednn, runtime

# Below this many multiply-adds (rows x K x N) oneDNN's three calls a step cost more than
# XLA's products: LeNet's 64 x 400 -> 120 (3.1M) step ran 4.10 against 3.72 ms on oneDNN.
ONEDNN_MIN_MACS = 1 << 22


def dot_general(lhs: jax.Array, rhs: jax.Array, dimension_numbers, precision=None,
                preferred_element_type=None, **kwargs) -> jax.Array:
  """``lax.dot_general``'s signature; ``nn.Dense``'s bfloat16 product, ``lhs [..., K]`` by
  ``rhs [K, N]``, on oneDNN where it runs there (see the module docstring), all others as
  lax's."""
  if (lhs.dtype == jnp.bfloat16 and rhs.dtype == jnp.bfloat16 and rhs.ndim == 2
      and lhs.ndim >= 1 and precision is None and preferred_element_type is None
      and not kwargs and dimension_numbers == (((lhs.ndim - 1,), (0,)), ((), ()))
      and lhs.size * rhs.shape[1] >= ONEDNN_MIN_MACS and runtime.onednn_in_use("bfloat16")):
    y = onednn.matmul(lhs.reshape(-1, lhs.shape[-1]), rhs)
    return y.reshape(*lhs.shape[:-1], rhs.shape[1])
  return lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                         preferred_element_type=preferred_element_type, **kwargs)


class Dense(nn.Dense):
  """``nn.Dense`` with the ``dot_general`` above. Input ``[..., K]``; returns
  ``[..., features]``."""
  dot_general: Any = dot_general
