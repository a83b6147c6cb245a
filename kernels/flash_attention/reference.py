"""Readable einsum reference of the kernel's semantics (O(N^2) memory)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def attention_mask(q_len: int, kv_len: int, *, is_causal: bool = False,
                   q_ids: jax.Array | None = None,
                   kv_ids: jax.Array | None = None) -> jax.Array:
  """Allowed (query, key) pairs: bool [B or 1, 1, Lq, Lk].

  Causal masking is bottom-right aligned: row r sees keys c <= r + Lk - Lq.
  """
  mask = jnp.ones((1, 1, q_len, kv_len), bool)
  if is_causal:
    rows = jnp.arange(q_len)[:, None]
    cols = jnp.arange(kv_len)[None, :]
    mask = jnp.logical_and(mask, (cols <= rows + (kv_len - q_len))[None, None])
  if q_ids is not None:
    same = q_ids[:, None, :, None] == kv_ids[:, None, None, :]
    mask = jnp.logical_and(mask, same)
  return mask


def attention_reference(query: jax.Array, key: jax.Array, value: jax.Array, *,
                        is_causal: bool = False, segment_ids=None,
                        scale: float | None = None) -> jax.Array:
  """Softmax attention with the kernel's semantics and a float32 softmax.

  Args:
    query: [B, Lq, H, D]; key: [B, Lk, Hkv, D]; value: [B, Lk, Hkv, Dv];
      H % Hkv == 0 (grouped-query heads, no repeat of K/V).
    is_causal: bottom-right aligned causal mask.
    segment_ids: int [B, L] (self attention) or (q_ids [B, Lq], kv_ids [B, Lk]);
      a query attends a key iff their ids are equal.
    scale: logits multiplier, default 1/sqrt(D).
  Returns:
    [B, Lq, H, Dv] in query's dtype; rows with no allowed key are zeros.
  """
  batch, q_len, num_heads, head_dim = query.shape
  kv_len, num_kv_heads = key.shape[1], key.shape[2]
  group = num_heads // num_kv_heads
  scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
  q_ids = kv_ids = None
  if segment_ids is not None:
    q_ids, kv_ids = (segment_ids if isinstance(segment_ids, (tuple, list))
                     else (segment_ids, segment_ids))
  q_BLKGD = query.reshape(batch, q_len, num_kv_heads, group, head_dim)
  logits_BKGQT = jnp.einsum("bqkgd,btkd->bkgqt", q_BLKGD, key,
                            preferred_element_type=jnp.float32) * scale
  mask_B11QT = attention_mask(q_len, kv_len, is_causal=is_causal,
                              q_ids=q_ids, kv_ids=kv_ids)[:, :, None]
  logits_BKGQT = jnp.where(mask_B11QT, logits_BKGQT, -jnp.inf)
  row_max = jnp.max(logits_BKGQT, axis=-1, keepdims=True)
  row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
  weights = jnp.exp(logits_BKGQT - row_max)
  denom = jnp.sum(weights, axis=-1, keepdims=True)
  weights = weights / jnp.where(denom == 0.0, 1.0, denom)
  out_BQKGD = jnp.einsum("bkgqt,btkd->bqkgd", weights.astype(value.dtype),
                         value, preferred_element_type=jnp.float32)
  return out_BQKGD.reshape(batch, q_len, num_heads,
                           value.shape[-1]).astype(query.dtype)
