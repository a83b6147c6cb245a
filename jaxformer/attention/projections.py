"""Projections of the attention module: a kernel contracted over several input dims,
and initializers for fused kernels made of blocks (q, k, v stacked in one matrix)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array
Initializer = Callable[..., Array]


def blocks_init(base_init: Initializer, in_dim: int, blocks: Sequence[tuple[int, ...]],
                 axis: int, shape: tuple[int, ...]) -> Initializer:
  """An initializer for a kernel made of blocks stacked along ``axis``.

  Block ``i`` is ``base_init(key_i, (in_dim, prod(blocks[i])))`` reshaped to
  ``(in_dim, *blocks[i])``; the blocks are concatenated on ``axis`` (of the full kernel).
  """

  def init(key, unused_shape, dtype=jnp.float32):
    keys = jax.random.split(key, len(blocks))
    parts = []
    for k, block in zip(keys, blocks):
      size = 1
      for s in block:
        size *= s
      parts.append(base_init(k, (in_dim, size), dtype).reshape((in_dim,) + tuple(block)))
    out = jnp.concatenate(parts, axis=axis)
    assert out.shape == shape, (out.shape, shape)
    return out

  return init


class Projection(nn.Module):
  """``y = x . kernel + bias``, contracting the last ``len(in_shape)`` dims of ``x``."""
  kernel_shape: tuple[int, ...]
  kernel_axes: tuple[str, ...]
  num_contract: int
  kernel_init: Initializer
  bias_init: Initializer
  use_bias: bool
  dtype: Any
  param_dtype: Any

  @nn.compact
  def __call__(self, x: Array) -> Array:
    kernel = self.param("kernel", nn.with_logical_partitioning(self.kernel_init,
                                                               self.kernel_axes),
                        self.kernel_shape, self.param_dtype)
    n = self.num_contract
    y = lax.dot_general(x.astype(self.dtype), jnp.asarray(kernel, self.dtype),
                        ((tuple(range(x.ndim - n, x.ndim)), tuple(range(n))), ((), ())))
    if self.use_bias:
      bias_shape = self.kernel_shape[n:]
      bias = self.param("bias", nn.with_logical_partitioning(self.bias_init,
                                                             self.kernel_axes[n:]),
                        bias_shape, self.param_dtype)
      y = y + jnp.asarray(bias, self.dtype).reshape((1,) * (y.ndim - bias.ndim) + bias_shape)
    return y
