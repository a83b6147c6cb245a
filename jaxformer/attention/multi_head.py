"""Multi-head attention module: projections, RoPE, KV cache; the math is in ``core``.

Parameters (every one with logical axis names from ``jaxformer.axes``):

| name    | when                         | kernel                   | axes                                  |
|---------|------------------------------|--------------------------|---------------------------------------|
| ``qkv``   | self attention, Hkv == H     | ``[E, 3, H, D]``           | embed, qkv, heads, head_dim            |
| ``qkv``   | self attention, Hkv < H (GQA)| ``[E, Hkv, H/Hkv + 2, D]`` | embed, kv_heads, qkv, head_dim         |
| ``query`` | cross attention              | ``[E, H, D]``              | embed, heads, head_dim                 |
| ``kv``    | cross attention              | ``[Ekv, 2, Hkv, D]``       | embed, qkv, kv_heads, head_dim         |
| ``out``   | always                       | ``[H, D, O]``              | heads, head_dim, embed                 |

In the GQA layout each key/value head sits next to the query heads of its group, so
tensor parallelism over ``kv_heads`` splits one fused kernel without any cross-talk.
Each block of a fused kernel is initialised like a separate ``[E, heads * D]`` dense
kernel (so fan-in / fan-out are those of the unfused projection).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from jaxformer import axes
from jaxformer.attention import core
from jaxformer.attention.rotary import apply_rotary_embedding

Array = jax.Array
Initializer = Callable[..., Array]

logger = logging.getLogger(__name__)


def _blocks_init(base_init: Initializer, in_dim: int, blocks: Sequence[tuple[int, ...]],
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


class _Projection(nn.Module):
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


class MultiHeadAttention(nn.Module):
  """Multi-head (optionally grouped-query) attention with fused projections.

  Attributes:
    num_heads: query heads H.
    num_kv_heads: key/value heads Hkv (``H % Hkv == 0``); None = H.
    head_dim: D; None = features // H.
    out_features: output width; None = the query input width.
    use_bias: biases in the projections.
    dropout_rate: dropout on the attention weights (forces the xla path while active).
    scale: logit multiplier (inverse temperature); None = 1/sqrt(D).
    hard: arg-max attention (see ``dot_product_attention``).
    rotary_base: not None -> RoPE with this base on queries and keys.
    implementation: passed to ``dot_product_attention``.
    decode: incremental decoding with a KV cache in the 'cache' collection (self
      attention only): initialise with a full-length input to size the cache, then each
      call appends its Lq tokens at ``cache_index`` and attends causally to the prefix.
    dtype: compute dtype; param_dtype: parameter dtype.
    kernel_init, bias_init: initializers (a fused kernel is initialised per block).
    out_kernel_init: initializer of the output projection ``out`` (as an
      ``[H * D, out_features]`` dense kernel); None = ``kernel_init``. GPT-2 / nanoGPT
      scale it down: ``normal(init_stddev / sqrt(2 * num_layers))``.
  """
  num_heads: int
  num_kv_heads: int | None = None
  head_dim: int | None = None
  out_features: int | None = None
  use_bias: bool = True
  dropout_rate: float = 0.0
  scale: float | None = None
  hard: bool = False
  rotary_base: float | None = None
  implementation: str | None = None
  decode: bool = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  kernel_init: Initializer = nn.initializers.xavier_uniform()
  bias_init: Initializer = nn.initializers.zeros_init()
  out_kernel_init: Initializer | None = None

  @nn.compact
  def __call__(self, inputs_q: Array, inputs_kv: Array | None = None, *,
               mask: Array | None = None, bias: Array | None = None,
               is_causal: bool = False,
               segment_ids: Array | tuple[Array, Array] | None = None,
               positions: Array | None = None, deterministic: bool = True,
               return_weights: bool = False) -> Array | tuple[Array, Array]:
    """Attends from ``inputs_q`` to ``inputs_kv`` (or to itself).

    Args:
      inputs_q: ``[B, Lq, E]``.
      inputs_kv: ``[B, Lk, Ekv]`` for cross attention; None for self attention.
      mask: bool, broadcastable to ``[B, H, Lq, Lk]`` (True = may attend).
      bias: float, broadcastable to ``[B, H, Lq, Lk]``.
      is_causal: causal masking (bottom-right aligned); implied in cached decoding.
      segment_ids: ``[B, L]`` or a pair, see ``dot_product_attention``.
      positions: ``[B, Lq]`` RoPE positions of the queries (self attention: also of the
        keys). Default ``arange(Lq)``, or ``cache_index + arange(Lq)`` when decoding.
      deterministic: disables dropout.
      return_weights: also return (and sow into 'intermediates' as
        'attention_weights') the ``[B, H, Lq, Lk]`` weights.
    Returns:
      ``[B, Lq, out_features]``, or ``(out, weights)`` with ``return_weights``.
    """
    num_heads, num_kv_heads, head_dim = self._check(inputs_q, inputs_kv, positions)
    features = inputs_q.shape[-1]
    q_len = inputs_q.shape[1]
    q_BQHD, k_BSKD, v_BSKD = self._project_qkv(inputs_q, inputs_kv, num_heads,
                                               num_kv_heads, head_dim)

    decoding = self.decode and inputs_kv is None
    cache_index = None
    if decoding:
      initialized = self.has_variable("cache", "cached_key")
      cached_key = self.variable("cache", "cached_key", jnp.zeros, k_BSKD.shape,
                                 k_BSKD.dtype)
      cached_value = self.variable("cache", "cached_value", jnp.zeros, v_BSKD.shape,
                                   v_BSKD.dtype)
      index_var = self.variable("cache", "cache_index",
                                lambda: jnp.array(0, dtype=jnp.int32))
      if initialized:
        cache_index = index_var.value

    if self.rotary_base is not None:
      if positions is None:
        positions = jnp.arange(q_len, dtype=jnp.int32)[None, :]
        if cache_index is not None:
          positions = positions + cache_index
      q_BQHD = apply_rotary_embedding(q_BQHD, positions, base=self.rotary_base)
      if inputs_kv is None:
        k_BSKD = apply_rotary_embedding(k_BSKD, positions, base=self.rotary_base)
      else:
        kv_pos = jnp.arange(k_BSKD.shape[1], dtype=jnp.int32)[None, :]
        k_BSKD = apply_rotary_embedding(k_BSKD, kv_pos, base=self.rotary_base)

    implementation = self.implementation
    if cache_index is not None:
      # One decoding step: write the new keys/values at cache_index, attend to the
      # prefix. (Indices past the cache length are clamped by dynamic_update_slice.)
      if segment_ids is not None:
        raise ValueError("MultiHeadAttention: segment_ids are not supported in cached "
                         "decoding steps; express padding with `mask` [B, 1, Lq, max_len]")
      max_len = cached_key.value.shape[1]
      k_BSKD = lax.dynamic_update_slice(cached_key.value, k_BSKD.astype(
          cached_key.value.dtype), (0, cache_index, 0, 0))
      v_BSKD = lax.dynamic_update_slice(cached_value.value, v_BSKD.astype(
          cached_value.value.dtype), (0, cache_index, 0, 0))
      cached_key.value, cached_value.value = k_BSKD, v_BSKD
      index_var.value = cache_index + q_len
      q_pos_Q = cache_index + jnp.arange(q_len)
      prefix_11QS = (jnp.arange(max_len)[None, :] <= q_pos_Q[:, None])[None, None]
      mask = prefix_11QS if mask is None else jnp.logical_and(mask, prefix_11QS)
      is_causal = False
      implementation = self._fallback(implementation, "a cached decoding step (explicit "
                                      "prefix mask)")

    dropout_rng = None
    if self.dropout_rate > 0.0 and not deterministic:
      dropout_rng = self.make_rng("dropout")
      implementation = self._fallback(implementation, "dropout on the weights")
    if return_weights:
      implementation = self._fallback(implementation, "return_weights")
    if self.hard:
      implementation = self._fallback(implementation, "hard attention")

    result = core.dot_product_attention(
        q_BQHD, k_BSKD, v_BSKD, mask=mask, bias=bias, is_causal=is_causal,
        segment_ids=segment_ids, scale=self.scale, hard=self.hard,
        return_weights=return_weights, implementation=implementation,
        dropout_rate=self.dropout_rate, dropout_rng=dropout_rng)
    out_BQHD, weights = result if return_weights else (result, None)
    if return_weights:
      self.sow("intermediates", "attention_weights", weights)

    out_features = self.out_features or features
    out = _Projection(
        kernel_shape=(num_heads, head_dim, out_features),
        kernel_axes=(axes.HEADS, axes.HEAD_DIM, axes.EMBED), num_contract=2,
        kernel_init=self._out_init(num_heads, head_dim, out_features),
        bias_init=self.bias_init, use_bias=self.use_bias, dtype=self.dtype,
        param_dtype=self.param_dtype, name="out")(out_BQHD)
    out = nn.with_logical_constraint(out, (axes.ACT_BATCH, axes.ACT_LENGTH, axes.ACT_EMBED))
    return (out, weights) if return_weights else out

  # ------------------------------------------------------------------------------------

  def _fallback(self, implementation: str | None, why: str) -> str | None:
    if implementation not in (None, "xla"):
      logger.info("MultiHeadAttention: %s needs the xla path; not using %r", why,
                  implementation)
      return None
    return implementation

  def _out_init(self, num_heads: int, head_dim: int, out_features: int) -> Initializer:
    base = self.kernel_init if self.out_kernel_init is None else self.out_kernel_init

    def init(key, shape, dtype=jnp.float32):
      return base(key, (num_heads * head_dim, out_features), dtype).reshape(shape)

    return init

  def _project_qkv(self, inputs_q, inputs_kv, num_heads, num_kv_heads, head_dim):
    """Returns ``q [B, Lq, H, D]``, ``k [B, Lk, Hkv, D]``, ``v [B, Lk, Hkv, D]``."""
    embed = inputs_q.shape[-1]
    proj = dict(bias_init=self.bias_init, use_bias=self.use_bias, dtype=self.dtype,
                param_dtype=self.param_dtype, num_contract=1)
    groups = num_heads // num_kv_heads
    if inputs_kv is None and num_kv_heads == num_heads:
      shape = (embed, 3, num_heads, head_dim)
      qkv_BL3HD = _Projection(
          kernel_shape=shape, kernel_axes=(axes.EMBED, axes.QKV, axes.HEADS, axes.HEAD_DIM),
          kernel_init=_blocks_init(self.kernel_init, embed, [(1, num_heads, head_dim)] * 3,
                                   1, shape), name="qkv", **proj)(inputs_q)
      q, k, v = qkv_BL3HD[:, :, 0], qkv_BL3HD[:, :, 1], qkv_BL3HD[:, :, 2]
    elif inputs_kv is None:
      shape = (embed, num_kv_heads, groups + 2, head_dim)
      qkv_BLKGD = _Projection(
          kernel_shape=shape,
          kernel_axes=(axes.EMBED, axes.KV_HEADS, axes.QKV, axes.HEAD_DIM),
          kernel_init=_blocks_init(self.kernel_init, embed,
                                   [(num_kv_heads, groups, head_dim),
                                    (num_kv_heads, 1, head_dim),
                                    (num_kv_heads, 1, head_dim)], 2, shape),
          name="qkv", **proj)(inputs_q)
      b, l = inputs_q.shape[:2]
      q = qkv_BLKGD[:, :, :, :groups].reshape(b, l, num_heads, head_dim)
      k, v = qkv_BLKGD[:, :, :, groups], qkv_BLKGD[:, :, :, groups + 1]
    else:
      q_shape = (embed, num_heads, head_dim)
      q = _Projection(
          kernel_shape=q_shape, kernel_axes=(axes.EMBED, axes.HEADS, axes.HEAD_DIM),
          kernel_init=_blocks_init(self.kernel_init, embed, [(num_heads, head_dim)], 1,
                                   q_shape), name="query", **proj)(inputs_q)
      kv_embed = inputs_kv.shape[-1]
      kv_shape = (kv_embed, 2, num_kv_heads, head_dim)
      kv_BS2KD = _Projection(
          kernel_shape=kv_shape,
          kernel_axes=(axes.EMBED, axes.QKV, axes.KV_HEADS, axes.HEAD_DIM),
          kernel_init=_blocks_init(self.kernel_init, kv_embed,
                                   [(1, num_kv_heads, head_dim)] * 2, 1, kv_shape),
          name="kv", **proj)(inputs_kv)
      k, v = kv_BS2KD[:, :, 0], kv_BS2KD[:, :, 1]
    q = nn.with_logical_constraint(q, (axes.ACT_BATCH, axes.ACT_LENGTH, axes.ACT_HEADS,
                                       axes.ACT_HEAD_DIM))
    k = nn.with_logical_constraint(k, (axes.ACT_BATCH, axes.ACT_LENGTH, axes.ACT_KV_HEADS,
                                       axes.ACT_HEAD_DIM))
    v = nn.with_logical_constraint(v, (axes.ACT_BATCH, axes.ACT_LENGTH, axes.ACT_KV_HEADS,
                                       axes.ACT_HEAD_DIM))
    return q, k, v

  def _check(self, inputs_q, inputs_kv, positions) -> tuple[int, int, int]:
    name = "MultiHeadAttention"
    if inputs_q.ndim != 3:
      raise ValueError(f"{name}: inputs_q must be [batch, length, features], got shape "
                       f"{inputs_q.shape}")
    if inputs_kv is not None and (inputs_kv.ndim != 3
                                  or inputs_kv.shape[0] != inputs_q.shape[0]):
      raise ValueError(f"{name}: inputs_kv must be [batch, kv_length, features] with the "
                       f"batch of inputs_q {inputs_q.shape}; got {inputs_kv.shape}")
    features = inputs_q.shape[-1]
    num_heads = self.num_heads
    num_kv_heads = self.num_kv_heads or num_heads
    if num_heads < 1 or num_heads % num_kv_heads:
      raise ValueError(f"{name}: num_heads={num_heads} must be a positive multiple of "
                       f"num_kv_heads={num_kv_heads}")
    head_dim = self.head_dim
    if head_dim is None:
      if features % num_heads:
        raise ValueError(f"{name}: features={features} is not divisible by num_heads="
                         f"{num_heads}; set head_dim explicitly")
      head_dim = features // num_heads
    if positions is not None and (jnp.ndim(positions) != 2
                                  or jnp.shape(positions)[1] != inputs_q.shape[1]):
      raise ValueError(f"{name}: positions must be [batch, q_length] = [*, "
                       f"{inputs_q.shape[1]}], got shape {jnp.shape(positions)}")
    return num_heads, num_kv_heads, head_dim
