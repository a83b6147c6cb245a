"""Multi-head attention module: projections, RoPE, KV cache; the math is in ``core``.

Parameters (every one with logical axis names from ``jaxformer.axes``):

| name    | when                         | kernel                   | axes                                  |
|---------|------------------------------|--------------------------|---------------------------------------|
| ``qkv``   | self attention, Hkv == H     | ``[E, 3, H, D]``           | embed, qkv, heads, head_dim            |
| ``qkv``   | self attention, Hkv < H (GQA)| ``[E, Hkv, H/Hkv + 2, D]`` | embed, kv_heads, qkv, head_dim         |
| ``query`` | cross attention              | ``[E, H, D]``              | embed, heads, head_dim                 |
| ``kv``    | cross attention              | ``[Ekv, 2, Hkv, D]``       | embed, qkv, kv_heads, head_dim         |
| ``out``   | always                       | ``[H, Dv, O]``             | heads, head_dim, embed                 |
| ``query_norm``, ``key_norm`` | ``qk_norm`` | scale (+ bias) ``[D]``     | head_dim                              |

With a value width ``Dv = value_head_dim`` different from the query/key width ``D`` the
q/k/v blocks no longer stack, so the fused kernels concatenate them along the last axis
instead (still one matrix, one matmul): self attention ``qkv [E, Hkv, G*D + D + Dv]``
(embed, heads or kv_heads, head_dim; ``G = H / Hkv``, each key/value head next to the
``G`` query heads of its group) and cross attention ``kv [Ekv, Hkv, D + Dv]``.

In the GQA layout each key/value head sits next to the query heads of its group, so
tensor parallelism over ``kv_heads`` splits one fused kernel without any cross-talk.
Each block of a fused kernel is initialised like a separate ``[E, heads * D]`` dense
kernel (so fan-in / fan-out are those of the unfused projection).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from jaxformer import axes
from jaxformer import norms
from jaxformer.attention import core
from jaxformer.attention import masks
from jaxformer.attention.projections import Projection, blocks_init
from jaxformer.attention.rotary import apply_rotary_embedding

Array = jax.Array
Initializer = Callable[..., Array]

logger = logging.getLogger(__name__)


class MultiHeadAttention(nn.Module):
  """Multi-head (optionally grouped-query) attention with fused projections.

  Attributes:
    num_heads: query heads H.
    num_kv_heads: key/value heads Hkv (``H % Hkv == 0``); None = H.
    head_dim: D, the query/key width per head; None = features // H.
    value_head_dim: Dv, the value width per head; None = D.
    out_features: output width; None = the query input width.
    use_bias: biases in the projections (the default of the next two).
    qkv_bias: biases on the q/k/v projections; None = use_bias.
    out_bias: bias on the output projection ``out``; None = use_bias.
    dropout_rate: dropout on the attention weights (forces the xla path while active).
    scale: logit multiplier (inverse temperature); None = 1/sqrt(D).
    hard: False, True (arg-max) or "straight_through" (see ``dot_product_attention``).
    rotary_base: not None -> RoPE with this base on queries and keys.
    qk_norm: None, "layernorm" or "rmsnorm": normalise each head's query and key over
      ``head_dim`` (one learned scale per norm, shared by the heads) before RoPE and
      the dot product, which bounds the logits (QK-norm, Dehghani et al. 2023).
    qk_norm_eps: epsilon of those norms.
    implementation: passed to ``dot_product_attention``.
    decode: incremental decoding with a KV cache in the 'cache' collection (self
      attention only): initialise with a full-length input to size the cache, then each
      call appends its Lq tokens at ``cache_index`` and attends causally to the prefix.
      A call whose tokens do not fit (``cache_index + Lq > max_len``) raises a
      ValueError when the index is known (outside ``jit``) and otherwise returns NaN for
      every position of that call and of every later one, never a clamped result.
    dtype: compute dtype; param_dtype: parameter dtype.
    kernel_init, bias_init: initializers (a fused kernel is initialised per block).
    out_kernel_init: initializer of the output projection ``out`` (as an
      ``[H * D, out_features]`` dense kernel); None = ``kernel_init``. GPT-2 / nanoGPT
      scale it down: ``normal(init_stddev / sqrt(2 * num_layers))``.
  """
  num_heads: int
  num_kv_heads: int | None = None
  head_dim: int | None = None
  value_head_dim: int | None = None
  out_features: int | None = None
  use_bias: bool = True
  qkv_bias: bool | None = None
  out_bias: bool | None = None
  dropout_rate: float = 0.0
  scale: float | None = None
  hard: bool | str = False
  rotary_base: float | None = None
  qk_norm: str | None = None
  qk_norm_eps: float = 1e-6
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
    value_dim = self.value_head_dim or head_dim
    features = inputs_q.shape[-1]
    q_len = inputs_q.shape[1]
    q_BQHD, k_BSKD, v_BSKD = self._project_qkv(inputs_q, inputs_kv, num_heads,
                                               num_kv_heads, head_dim, value_dim)

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

    if self.qk_norm is not None:
      q_BQHD = self._qk_norm("query_norm")(q_BQHD)
      k_BSKD = self._qk_norm("key_norm")(k_BSKD)
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
    overflow = None
    if cache_index is not None:
      # One decoding step: write the new keys/values at cache_index, attend to the
      # prefix. dynamic_update_slice clamps an index past the end (it would overwrite
      # earlier keys), so such a call is an error or NaN, see `overflow`.
      if segment_ids is not None:
        raise ValueError("MultiHeadAttention: segment_ids are not supported in cached "
                         "decoding steps; express padding with `mask` [B, 1, Lq, max_len]")
      max_len = cached_key.value.shape[1]
      overflow = _check_cache_room(cache_index, q_len, max_len)
      k_BSKD = lax.dynamic_update_slice(cached_key.value, k_BSKD.astype(
          cached_key.value.dtype), (0, cache_index, 0, 0))
      v_BSKD = lax.dynamic_update_slice(cached_value.value, v_BSKD.astype(
          cached_value.value.dtype), (0, cache_index, 0, 0))
      cached_key.value, cached_value.value = k_BSKD, v_BSKD
      index_var.value = cache_index + q_len
      prefix_11QS = masks.make_prefix_mask(cache_index + jnp.arange(q_len), max_len)
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
    if overflow is not None:  # traced index: a call past the cache cannot pass for right
      out_BQHD = jnp.where(overflow, jnp.asarray(jnp.nan, out_BQHD.dtype), out_BQHD)
    if return_weights:
      self.sow("intermediates", "attention_weights", weights)

    out_features = self.out_features or features
    out = Projection(
        kernel_shape=(num_heads, value_dim, out_features),
        kernel_axes=(axes.HEADS, axes.HEAD_DIM, axes.EMBED), num_contract=2,
        kernel_init=self._out_init(num_heads, value_dim, out_features),
        bias_init=self.bias_init, use_bias=_default(self.out_bias, self.use_bias),
        dtype=self.dtype,
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

  def _qk_norm(self, name: str) -> nn.Module:
    """A LayerNorm / RMSNorm over ``head_dim`` (statistics in float32)."""
    if self.qk_norm not in norms.NORM_TYPES:
      raise ValueError(f"MultiHeadAttention.qk_norm={self.qk_norm!r}: expected None or "
                       f"one of {sorted(norms.NORM_TYPES)}")
    return norms.make_norm(self.qk_norm, eps=self.qk_norm_eps, dtype=self.dtype,
                           param_dtype=self.param_dtype, name=name, axis=axes.HEAD_DIM)

  def _out_init(self, num_heads: int, head_dim: int, out_features: int) -> Initializer:
    base = self.kernel_init if self.out_kernel_init is None else self.out_kernel_init

    def init(key, shape, dtype=jnp.float32):
      return base(key, (num_heads * head_dim, out_features), dtype).reshape(shape)

    return init

  def _project_qkv(self, inputs_q, inputs_kv, num_heads, num_kv_heads, head_dim,
                   value_dim):
    """Returns ``q [B, Lq, H, D]``, ``k [B, Lk, Hkv, D]``, ``v [B, Lk, Hkv, Dv]``."""
    embed = inputs_q.shape[-1]
    proj = dict(bias_init=self.bias_init, use_bias=_default(self.qkv_bias, self.use_bias),
                dtype=self.dtype, param_dtype=self.param_dtype, num_contract=1)
    groups = num_heads // num_kv_heads
    b, l = inputs_q.shape[:2]
    d, dv = head_dim, value_dim
    if inputs_kv is None and d != dv:
      # Widths differ: q, k, v of one kv head concatenated on the last axis.
      heads_axis = axes.HEADS if groups == 1 else axes.KV_HEADS
      shape = (embed, num_kv_heads, groups * d + d + dv)
      qkv_BLKF = Projection(
          kernel_shape=shape, kernel_axes=(axes.EMBED, heads_axis, axes.HEAD_DIM),
          kernel_init=blocks_init(self.kernel_init, embed,
                                   [(num_kv_heads, groups * d), (num_kv_heads, d),
                                    (num_kv_heads, dv)], 2, shape),
          name="qkv", **proj)(inputs_q)
      q = qkv_BLKF[..., :groups * d].reshape(b, l, num_heads, d)
      k, v = qkv_BLKF[..., groups * d:groups * d + d], qkv_BLKF[..., groups * d + d:]
    elif inputs_kv is None and num_kv_heads == num_heads:
      shape = (embed, 3, num_heads, d)
      qkv_BL3HD = Projection(
          kernel_shape=shape, kernel_axes=(axes.EMBED, axes.QKV, axes.HEADS, axes.HEAD_DIM),
          kernel_init=blocks_init(self.kernel_init, embed, [(1, num_heads, d)] * 3,
                                   1, shape), name="qkv", **proj)(inputs_q)
      q, k, v = qkv_BL3HD[:, :, 0], qkv_BL3HD[:, :, 1], qkv_BL3HD[:, :, 2]
    elif inputs_kv is None:
      shape = (embed, num_kv_heads, groups + 2, d)
      qkv_BLKGD = Projection(
          kernel_shape=shape,
          kernel_axes=(axes.EMBED, axes.KV_HEADS, axes.QKV, axes.HEAD_DIM),
          kernel_init=blocks_init(self.kernel_init, embed,
                                   [(num_kv_heads, groups, d), (num_kv_heads, 1, d),
                                    (num_kv_heads, 1, d)], 2, shape),
          name="qkv", **proj)(inputs_q)
      q = qkv_BLKGD[:, :, :, :groups].reshape(b, l, num_heads, d)
      k, v = qkv_BLKGD[:, :, :, groups], qkv_BLKGD[:, :, :, groups + 1]
    else:
      q_shape = (embed, num_heads, d)
      q = Projection(
          kernel_shape=q_shape, kernel_axes=(axes.EMBED, axes.HEADS, axes.HEAD_DIM),
          kernel_init=blocks_init(self.kernel_init, embed, [(num_heads, d)], 1,
                                   q_shape), name="query", **proj)(inputs_q)
      kv_embed = inputs_kv.shape[-1]
      if d == dv:
        kv_shape = (kv_embed, 2, num_kv_heads, d)
        kv_BS2KD = Projection(
            kernel_shape=kv_shape,
            kernel_axes=(axes.EMBED, axes.QKV, axes.KV_HEADS, axes.HEAD_DIM),
            kernel_init=blocks_init(self.kernel_init, kv_embed,
                                     [(1, num_kv_heads, d)] * 2, 1, kv_shape),
            name="kv", **proj)(inputs_kv)
        k, v = kv_BS2KD[:, :, 0], kv_BS2KD[:, :, 1]
      else:
        kv_shape = (kv_embed, num_kv_heads, d + dv)
        kv_BSKF = Projection(
            kernel_shape=kv_shape,
            kernel_axes=(axes.EMBED, axes.KV_HEADS, axes.HEAD_DIM),
            kernel_init=blocks_init(self.kernel_init, kv_embed,
                                     [(num_kv_heads, d), (num_kv_heads, dv)], 2, kv_shape),
            name="kv", **proj)(inputs_kv)
        k, v = kv_BSKF[..., :d], kv_BSKF[..., d:]
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
    num_kv_heads = num_heads if self.num_kv_heads is None else self.num_kv_heads
    for field, value in (("num_heads", num_heads), ("num_kv_heads", num_kv_heads),
                         ("head_dim", self.head_dim or 1),
                         ("value_head_dim", self.value_head_dim or 1)):
      if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}.{field}={value!r}: expected a positive int")
    if num_heads % num_kv_heads:
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


def _default(flag: bool | None, default: bool) -> bool:
  return default if flag is None else flag


def _check_cache_room(cache_index: Array, q_len: int, max_len: int) -> Array | None:
  """Raises when ``q_len`` tokens at ``cache_index`` cannot fit in ``max_len`` slots.

  Returns None when the check ran (lengths known at trace time), else a traced bool
  scalar that is True when the call overflows (the caller then outputs NaN).
  """
  if q_len > max_len:
    raise ValueError(f"MultiHeadAttention: {q_len} tokens in one decoding call exceed the "
                     f"KV cache of max_len={max_len} (sized by the input given to init)")
  if isinstance(cache_index, jax.core.Tracer):
    return cache_index + q_len > max_len
  index = int(cache_index)
  if index + q_len > max_len:
    raise ValueError(f"MultiHeadAttention: decoding {q_len} token(s) at cache index "
                     f"{index} overflows the KV cache of max_len={max_len} (sized by "
                     "the input given to init); init with a longer input")
  return None

