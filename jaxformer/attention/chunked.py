"""Flash attention in plain JAX: query blocks x key blocks, online softmax, O(N·block).

The algorithm of FlashAttention-2 (Dao, 2023) written with ``lax`` loops instead of a
kernel, so that it runs (and is differentiable) everywhere:

* forward: for each query block (``lax.map``), loop over the key blocks it can see
  (``lax.fori_loop`` with a *dynamic* upper bound: under ``is_causal`` the blocks above
  the diagonal are never visited), keeping a running max ``m`` and sum ``l`` of the
  exponentials in float32 and a rescaled accumulator; save ``lse = m + log l``.
* backward (``jax.custom_vjp``): for each key block (``lax.scan``), loop over the query
  blocks that can see it, recompute ``p = exp(s - lse)`` blockwise and accumulate
  ``dK, dV`` for the block and ``dQ`` in a carried float32 buffer. Nothing N x N is ever
  stored: memory is O(N·(D + block)).

Supports ``is_causal`` (bottom-right aligned), segment ids, grouped-query attention (the
query heads of a group are stacked in one block), ``Dv != Dqk``, ``Lq != Lk`` and
lengths that are not multiples of the block (padded, padded keys masked), and an
explicit boolean mask broadcastable to ``[B, H, Lq, Lk]`` (sliced blockwise, so a
``[B, 1, 1, Lk]`` padding mask costs O(N)). A bias is not supported (it would need its
own gradient): ``dot_product_attention`` falls back to ``"xla"`` for it.

Measured ad hoc on the shared 2-core CPU (float32, causal, batch 1, 4 heads x 64; the
machine was loaded ~4x by other jobs, so times are +-50%): at 8k tokens fwd 0.6-1.6 s,
fwd+bwd 5-6 s, peak process RSS 0.45-0.49 GB, against 16 s / 31 s / 7.6 GB for the XLA
path under the same load (experiments/benchmarks/results/cpu-2026-11-25.md); 16k
fwd+bwd 12-19 s at 0.57 GB RSS; 32k fwd+bwd ran (80 s, 0.68 GB). Block 512 was the best
of {256, 512, 1024}. Merging the group and query axes before each matmul (below) made
the backward ~1.5-2x faster.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array

DEFAULT_BLOCK_Q = 512
DEFAULT_BLOCK_K = 512

_NEG = -1e30   # logit of a masked key (finite: no inf - inf = nan anywhere)
_POS = 1e30    # lse of a row with no allowed key: exp(s - lse) == 0


@dataclasses.dataclass(frozen=True)
class _Config:
  is_causal: bool
  scale: float
  block_q: int
  block_k: int
  q_len: int
  kv_len: int
  num_q_blocks: int
  num_k_blocks: int
  precision: Any = None

  @property
  def offset(self) -> int:
    """Causal offset: query ``i`` sits at key position ``i + offset``."""
    return self.kv_len - self.q_len

  @property
  def pads_keys(self) -> bool:
    return self.num_k_blocks * self.block_k != self.kv_len


def chunked_attention(query: Array, key: Array, value: Array, *, is_causal: bool = False,
                      q_segment_ids: Array | None = None,
                      kv_segment_ids: Array | None = None, mask: Array | None = None,
                      scale: float | None = None, block_q: int | None = None,
                      block_k: int | None = None, precision: Any = None) -> Array:
  """Blockwise attention with a recomputing backward pass.

  Args:
    query: ``[B, Lq, H, Dqk]``.
    key: ``[B, Lk, Hkv, Dqk]``.
    value: ``[B, Lk, Hkv, Dv]``.
    is_causal: bottom-right aligned causal masking; key blocks entirely above the
      diagonal are skipped (forward and backward).
    q_segment_ids: int ``[B, Lq]``; with ``kv_segment_ids [B, Lk]``, attend iff equal.
    kv_segment_ids: int ``[B, Lk]``.
    mask: bool, rank 4, broadcastable to ``[B, H, Lq, Lk]`` (True = may attend).
    scale: logit multiplier, default ``1 / sqrt(Dqk)``.
    block_q: query rows per block (default 512, capped at the padded length).
    block_k: keys per block (default 512, capped at the padded length).
    precision: of the einsums (``jax.lax.Precision`` or its name); None = JAX's default.
  Returns:
    ``[B, Lq, H, Dv]`` in the dtype of ``query``; rows with no allowed key are zeros.
  """
  batch, q_len, num_heads, head_dim = query.shape
  _, kv_len, num_kv_heads, v_dim = value.shape
  if (q_segment_ids is None) != (kv_segment_ids is None):
    raise ValueError("chunked_attention: pass both q_segment_ids and kv_segment_ids, or "
                     "neither")
  if kv_len == 0 or q_len == 0:
    raise ValueError(f"chunked_attention: empty sequence (query length {q_len}, key "
                     f"length {kv_len}); softmax over no keys is undefined")
  groups = num_heads // num_kv_heads
  bq = _block_size(block_q, DEFAULT_BLOCK_Q, q_len, "block_q")
  bk = _block_size(block_k, DEFAULT_BLOCK_K, kv_len, "block_k")
  nq, nk = -(-q_len // bq), -(-kv_len // bk)
  cfg = _Config(is_causal=bool(is_causal),
                scale=float(head_dim ** -0.5 if scale is None else scale),
                block_q=bq, block_k=bk, q_len=q_len, kv_len=kv_len,
                num_q_blocks=nq, num_k_blocks=nk, precision=precision)

  # [B, L, ...] -> blocks along a new leading axis.
  q_NBKGQD = _pad_axis(query, 1, nq * bq).reshape(
      batch, nq, bq, num_kv_heads, groups, head_dim).transpose(1, 0, 3, 4, 2, 5)
  k_NBKSD = _pad_axis(key, 1, nk * bk).reshape(
      batch, nk, bk, num_kv_heads, head_dim).transpose(1, 0, 3, 2, 4)
  v_NBKSD = _pad_axis(value, 1, nk * bk).reshape(
      batch, nk, bk, num_kv_heads, v_dim).transpose(1, 0, 3, 2, 4)
  if q_segment_ids is not None:
    qs_NBQ = _pad_axis(jnp.asarray(q_segment_ids), 1, nq * bq).reshape(
        batch, nq, bq).transpose(1, 0, 2)
    ks_NBS = _pad_axis(jnp.asarray(kv_segment_ids), 1, nk * bk).reshape(
        batch, nk, bk).transpose(1, 0, 2)
  else:
    qs_NBQ = ks_NBS = None

  mask_BKGQS = None
  if mask is not None:
    mask_BKGQS = _prepare_mask(jnp.asarray(mask), num_kv_heads, nq * bq, nk * bk)
  out_NBKGQD = _flash(cfg, q_NBKGQD, k_NBKSD, v_NBKSD, qs_NBQ, ks_NBS, mask_BKGQS)
  out = out_NBKGQD.transpose(1, 0, 4, 2, 3, 5).reshape(batch, nq * bq, num_heads, v_dim)
  return out[:, :q_len]


def _block_size(block: int | None, default: int, length: int, name: str) -> int:
  if block is None:
    block = default
  if not isinstance(block, int) or block < 1:
    raise ValueError(f"chunked_attention: {name}={block!r}; expected a positive int")
  return min(block, max(8, -(-length // 8) * 8))


def _prepare_mask(mask: Array, num_kv_heads: int, q_size: int, k_size: int) -> Array:
  """``[B|1, H|1, Lq|1, Lk|1]`` -> ``[B|1, Hkv|1, G|1, q_size|1, k_size|1]`` (padded)."""
  if mask.ndim != 4 or mask.dtype != jnp.bool_:
    raise ValueError(f"chunked_attention: mask must be a rank-4 bool array, got "
                     f"{mask.dtype}{list(mask.shape)}")
  mask = mask if mask.shape[2] == 1 else _pad_axis(mask, 2, q_size)
  mask = mask if mask.shape[3] == 1 else _pad_axis(mask, 3, k_size)
  b, h, q, k = mask.shape
  if h == 1:
    return mask[:, :, None]
  return mask.reshape(b, num_kv_heads, h // num_kv_heads, q, k)


def _pad_axis(x: Array, axis: int, size: int) -> Array:
  extra = size - x.shape[axis]
  if extra == 0:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, extra)
  return jnp.pad(x, widths)


def _num_k_blocks_for(cfg: _Config, i: Array) -> Array:
  """Number of key blocks that query block ``i`` can see (all, or up to the diagonal)."""
  if not cfg.is_causal:
    return jnp.asarray(cfg.num_k_blocks, jnp.int32)
  last_q = jnp.minimum((i + 1) * cfg.block_q, cfg.q_len) - 1 + cfg.offset
  return jnp.clip(last_q // cfg.block_k + 1, 0, cfg.num_k_blocks).astype(jnp.int32)


def _first_q_block_for(cfg: _Config, j: Array) -> Array:
  """First query block that can see key block ``j``."""
  if not cfg.is_causal:
    return jnp.asarray(0, jnp.int32)
  first = (j * cfg.block_k - cfg.offset) // cfg.block_q
  return jnp.clip(first, 0, cfg.num_q_blocks).astype(jnp.int32)


def _block_mask(cfg: _Config, i: Array, j: Array, qs_BQ: Array | None,
                ks_BS: Array | None, explicit: Array | None) -> Array | None:
  """Allowed ``[B|1, Hkv|1, G|1, bq, bk]`` for query block ``i`` x key block ``j``.

  ``explicit`` is the prepared ``[B|1, Hkv|1, G|1, Lq|1, Lk|1]`` mask, or None; returns
  None when nothing is masked.
  """
  mask = None
  if cfg.pads_keys or cfg.is_causal:
    k_pos_S = j * cfg.block_k + jnp.arange(cfg.block_k)
    mask_QS = jnp.broadcast_to((k_pos_S < cfg.kv_len)[None, :], (cfg.block_q, cfg.block_k))
    if cfg.is_causal:
      q_pos_Q = i * cfg.block_q + jnp.arange(cfg.block_q) + cfg.offset
      mask_QS = jnp.logical_and(mask_QS, q_pos_Q[:, None] >= k_pos_S[None, :])
    mask = mask_QS[None, None, None]
  if qs_BQ is not None:
    seg_BQS = qs_BQ[:, :, None] == ks_BS[:, None, :]
    seg = seg_BQS[:, None, None]
    mask = seg if mask is None else jnp.logical_and(mask, seg)
  if explicit is not None:
    if explicit.shape[-2] > 1:
      explicit = lax.dynamic_slice_in_dim(explicit, i * cfg.block_q, cfg.block_q, axis=-2)
    if explicit.shape[-1] > 1:
      explicit = lax.dynamic_slice_in_dim(explicit, j * cfg.block_k, cfg.block_k, axis=-1)
    mask = explicit if mask is None else jnp.logical_and(mask, explicit)
  return mask


# The block matmuls. The group and query axes are merged (a free reshape) so that each
# product is a plain batched matmul with one contracting axis: XLA's CPU backend is
# several times slower on the equivalent two-axis contractions (measured).


def _scores(cfg: _Config, q_BKGQD: Array, k_BKSD: Array) -> Array:
  """``scale * q k^T``: ``[B, K, G, Q, D] x [B, K, S, D] -> [B, K, G, Q, S]`` float32."""
  b, h, g, q, d = q_BKGQD.shape
  s_BKNS = jnp.einsum("bhnd,bhsd->bhns", q_BKGQD.reshape(b, h, g * q, d), k_BKSD,
                      preferred_element_type=jnp.float32, precision=cfg.precision)
  return s_BKNS.reshape(b, h, g, q, k_BKSD.shape[2]) * cfg.scale


def _rows_times(cfg: _Config, x_BKGQS: Array, y_BKSD: Array) -> Array:
  """``x y``: ``[B, K, G, Q, S] x [B, K, S, D] -> [B, K, G, Q, D]`` float32."""
  b, h, g, q, s = x_BKGQS.shape
  out_BKND = jnp.einsum("bhns,bhsd->bhnd", x_BKGQS.reshape(b, h, g * q, s), y_BKSD,
                        preferred_element_type=jnp.float32, precision=cfg.precision)
  return out_BKND.reshape(b, h, g, q, y_BKSD.shape[-1])


def _cols_times(cfg: _Config, x_BKGQS: Array, y_BKGQD: Array) -> Array:
  """``x^T y`` summed over groups: ``[B, K, G, Q, S] x [B, K, G, Q, D] -> [B, K, S, D]``."""
  b, h, g, q, s = x_BKGQS.shape
  return jnp.einsum("bhns,bhnd->bhsd", x_BKGQS.reshape(b, h, g * q, s),
                    y_BKGQD.reshape(b, h, g * q, y_BKGQD.shape[-1]),
                    preferred_element_type=jnp.float32, precision=cfg.precision)


def _forward(cfg: _Config, q, k, v, qs, ks, explicit) -> tuple[Array, Array]:
  """Returns ``out [N, B, Hkv, G, bq, Dv]`` (query dtype) and ``lse [N, B, Hkv, G, bq]``."""
  _, batch, num_kv_heads, groups, bq, _ = q.shape
  v_dim = v.shape[-1]

  def one_query_block(args):
    i, q_BKGQD, qs_BQ = args

    def body(j, carry):
      m_BKGQ, l_BKGQ, acc_BKGQD = carry
      k_BKSD = lax.dynamic_index_in_dim(k, j, keepdims=False)
      v_BKSD = lax.dynamic_index_in_dim(v, j, keepdims=False)
      ks_BS = None if ks is None else lax.dynamic_index_in_dim(ks, j, keepdims=False)
      s_BKGQS = _scores(cfg, q_BKGQD, k_BKSD)
      mask = _block_mask(cfg, i, j, qs_BQ, ks_BS, explicit)
      if mask is not None:
        s_BKGQS = jnp.where(mask, s_BKGQS, _NEG)
      m_new = jnp.maximum(m_BKGQ, jnp.max(s_BKGQS, axis=-1))
      correction = jnp.exp(m_BKGQ - m_new)
      p_BKGQS = jnp.exp(s_BKGQS - m_new[..., None])
      if mask is not None:
        p_BKGQS = jnp.where(mask, p_BKGQS, 0.0)   # all-masked-so-far rows stay at 0
      l_new = l_BKGQ * correction + jnp.sum(p_BKGQS, axis=-1)
      pv = _rows_times(cfg, p_BKGQS.astype(v.dtype), v_BKSD)
      return m_new, l_new, acc_BKGQD * correction[..., None] + pv

    stats_shape = (batch, num_kv_heads, groups, bq)
    init = (jnp.full(stats_shape, _NEG, jnp.float32), jnp.zeros(stats_shape, jnp.float32),
            jnp.zeros(stats_shape + (v_dim,), jnp.float32))
    m, l, acc = lax.fori_loop(0, _num_k_blocks_for(cfg, i), body, init)
    seen = l > 0.0
    out = jnp.where(seen[..., None], acc / jnp.where(seen, l, 1.0)[..., None], 0.0)
    lse = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), _POS)
    return out.astype(q.dtype), lse

  idx = jnp.arange(cfg.num_q_blocks, dtype=jnp.int32)
  return lax.map(one_query_block, (idx, q, qs))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(cfg: _Config, q, k, v, qs, ks, explicit) -> Array:
  return _forward(cfg, q, k, v, qs, ks, explicit)[0]


def _flash_fwd(cfg: _Config, q, k, v, qs, ks, explicit):
  out, lse = _forward(cfg, q, k, v, qs, ks, explicit)
  return out, (q, k, v, qs, ks, explicit, out, lse)


def _flash_bwd(cfg: _Config, residuals, d_out):
  q, k, v, qs, ks, explicit, out, lse = residuals
  # delta_i = sum_d dO_id O_id = sum_s P_is dP_is (the softmax Jacobian's diagonal term).
  delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)

  def one_key_block(dq, args):
    j, k_BKSD, v_BKSD, ks_BS = args

    def body(i, carry):
      dq, dk_BKSD, dv_BKSD = carry
      q_BKGQD = lax.dynamic_index_in_dim(q, i, keepdims=False)
      do_BKGQD = lax.dynamic_index_in_dim(d_out, i, keepdims=False)
      lse_BKGQ = lax.dynamic_index_in_dim(lse, i, keepdims=False)
      delta_BKGQ = lax.dynamic_index_in_dim(delta, i, keepdims=False)
      qs_BQ = None if qs is None else lax.dynamic_index_in_dim(qs, i, keepdims=False)
      s_BKGQS = _scores(cfg, q_BKGQD, k_BKSD)
      p_BKGQS = jnp.exp(s_BKGQS - lse_BKGQ[..., None])
      mask = _block_mask(cfg, i, j, qs_BQ, ks_BS, explicit)
      if mask is not None:
        p_BKGQS = jnp.where(mask, p_BKGQS, 0.0)
      dv_BKSD = dv_BKSD + _cols_times(cfg, p_BKGQS.astype(d_out.dtype), do_BKGQD)
      dp_BKGQS = _scores(dataclasses.replace(cfg, scale=1.0), do_BKGQD, v_BKSD)
      ds_BKGQS = p_BKGQS * (dp_BKGQS - delta_BKGQ[..., None]) * cfg.scale
      dq_i = _rows_times(cfg, ds_BKGQS, k_BKSD.astype(jnp.float32))
      dq = lax.dynamic_update_index_in_dim(
          dq, lax.dynamic_index_in_dim(dq, i, keepdims=False) + dq_i, i, 0)
      dk_BKSD = dk_BKSD + _cols_times(cfg, ds_BKGQS, q_BKGQD.astype(jnp.float32))
      return dq, dk_BKSD, dv_BKSD

    init = (dq, jnp.zeros(k_BKSD.shape, jnp.float32), jnp.zeros(v_BKSD.shape, jnp.float32))
    dq, dk, dv = lax.fori_loop(_first_q_block_for(cfg, j), cfg.num_q_blocks, body, init)
    return dq, (dk, dv)

  idx = jnp.arange(cfg.num_k_blocks, dtype=jnp.int32)
  dq, (dk, dv) = lax.scan(one_key_block, jnp.zeros(q.shape, jnp.float32),
                          (idx, k, v, ks))
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


# --------------------------------------------------------------------------------------
# The same kernel with its log-sum-exp exposed: the block kernel of ring attention
# (ring.py), which merges partial results by lse and runs the backward per block.
# --------------------------------------------------------------------------------------


def _blocked(query, key, value, q_segment_ids, kv_segment_ids, is_causal, scale,
             precision):
  """The static config and the blocked operands of ``chunked_attention``."""
  batch, q_len, num_heads, head_dim = query.shape
  _, kv_len, num_kv_heads, v_dim = value.shape
  groups = num_heads // num_kv_heads
  bq = _block_size(None, DEFAULT_BLOCK_Q, q_len, "block_q")
  bk = _block_size(None, DEFAULT_BLOCK_K, kv_len, "block_k")
  nq, nk = -(-q_len // bq), -(-kv_len // bk)
  cfg = _Config(is_causal=bool(is_causal), scale=float(scale), block_q=bq, block_k=bk,
                q_len=q_len, kv_len=kv_len, num_q_blocks=nq, num_k_blocks=nk,
                precision=precision)
  q = _to_q_blocks(cfg, query, num_kv_heads)
  k = _pad_axis(key, 1, nk * bk).reshape(
      batch, nk, bk, num_kv_heads, head_dim).transpose(1, 0, 3, 2, 4)
  v = _pad_axis(value, 1, nk * bk).reshape(
      batch, nk, bk, num_kv_heads, v_dim).transpose(1, 0, 3, 2, 4)
  qs = ks = None
  if q_segment_ids is not None:
    qs = _pad_axis(jnp.asarray(q_segment_ids), 1, nq * bq).reshape(
        batch, nq, bq).transpose(1, 0, 2)
    ks = _pad_axis(jnp.asarray(kv_segment_ids), 1, nk * bk).reshape(
        batch, nk, bk).transpose(1, 0, 2)
  return cfg, q, k, v, qs, ks


def _to_q_blocks(cfg: _Config, x_BQHD: Array, num_kv_heads: int) -> Array:
  b, _, h, d = x_BQHD.shape
  return _pad_axis(x_BQHD, 1, cfg.num_q_blocks * cfg.block_q).reshape(
      b, cfg.num_q_blocks, cfg.block_q, num_kv_heads, h // num_kv_heads, d).transpose(
          1, 0, 3, 4, 2, 5)


def _from_q_blocks(cfg: _Config, x_NBKGQD: Array) -> Array:
  n, b, kh, g, bq, d = x_NBKGQD.shape
  return x_NBKGQD.transpose(1, 0, 4, 2, 3, 5).reshape(b, n * bq, kh * g, d)[:, :cfg.q_len]


def attention_with_lse(query: Array, key: Array, value: Array, *, is_causal: bool,
                       q_segment_ids: Array | None, kv_segment_ids: Array | None,
                       scale: float, precision: Any = None) -> tuple[Array, Array]:
  """Forward of ``chunked_attention`` (no gradient rule) returning the log-sum-exp.

  Returns:
    ``out [B, Lq, H, Dv]`` (query dtype, zeros where no key is allowed) and ``lse
    [B, H, Lq]`` float32 (``1e30`` where no key is allowed, so ``exp(s - lse) == 0``).
  """
  cfg, q, k, v, qs, ks = _blocked(query, key, value, q_segment_ids, kv_segment_ids,
                                  is_causal, scale, precision)
  out, lse = _forward(cfg, q, k, v, qs, ks, None)
  b, h = query.shape[0], query.shape[2]
  lse_BHQ = lse.transpose(1, 2, 3, 0, 4).reshape(b, h, -1)[:, :, :cfg.q_len]
  return _from_q_blocks(cfg, out), lse_BHQ


def attention_backward(query: Array, key: Array, value: Array, out: Array, lse: Array,
                       d_out: Array, *, is_causal: bool, q_segment_ids: Array | None,
                       kv_segment_ids: Array | None, scale: float,
                       precision: Any = None) -> tuple[Array, Array, Array]:
  """``(dq, dk, dv)`` of attention given its output and (possibly global) lse.

  ``out``/``lse`` may be those of a larger attention that this call's keys are part of
  (ring attention passes the merged ones): then ``p = exp(s - lse)`` are that
  attention's probabilities restricted to these keys, and the results are this block's
  exact contribution to the full gradients.
  """
  cfg, q, k, v, qs, ks = _blocked(query, key, value, q_segment_ids, kv_segment_ids,
                                  is_causal, scale, precision)
  num_kv_heads = key.shape[2]
  out_b = _to_q_blocks(cfg, out, num_kv_heads)
  d_out_b = _to_q_blocks(cfg, d_out.astype(out.dtype), num_kv_heads)
  b, h, _ = lse.shape
  nq, bq = cfg.num_q_blocks, cfg.block_q
  lse_b = jnp.pad(lse, ((0, 0), (0, 0), (0, nq * bq - cfg.q_len)),
                  constant_values=_POS).reshape(
                      b, num_kv_heads, h // num_kv_heads, nq, bq).transpose(3, 0, 1, 2, 4)
  dq, dk, dv, *_ = _flash_bwd(cfg, (q, k, v, qs, ks, None, out_b, lse_b), d_out_b)
  dk = dk.transpose(1, 0, 3, 2, 4).reshape(key.shape[0], -1, *key.shape[2:])
  dv = dv.transpose(1, 0, 3, 2, 4).reshape(value.shape[0], -1, *value.shape[2:])
  return _from_q_blocks(cfg, dq), dk[:, :cfg.kv_len], dv[:, :cfg.kv_len]
