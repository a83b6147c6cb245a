"""Flash attention backward pass, Pallas Triton lowering (FlashAttention-2).

Split into dK/dV then dQ (no atomics, so results are deterministic), on
unpadded lengths with masked loads/stores at the ends (see gpu.py):
  0. delta = rowsum(dO * O) in XLA (a fused, memory-bound reduction);
  1. dK/dV: one program per (query head, batch, key tile) loops over the
     query tiles that can see the key tile. Under grouped-query attention each
     query head writes its own float32 partial dK/dV, summed over the group in
     XLA: `group` times more programs than one per kv head (the GPU fills up
     even with few kv heads) for one extra [B, Lk, H, D] float32 buffer;
  2. dQ: one program per (query head, batch, query tile) loops over key tiles.
Both grids put the tile axis slowest, heavy tiles first under `causal` (key
tile 0 is seen by every query tile; query tiles are reversed, as in the
forward), and skip tile pairs with disjoint segment-id ranges.
With s = scale * q.k and P = exp(s - lse) (computed in base 2 from the forward's
base-2 lse, see `_probs`):
  dV = P^T dO,  dP = dO V^T,  dS = P * (dP - delta),  dQ = scale dS K,
  dK = scale dS^T Q.
"""

from __future__ import annotations

import functools

import jax
from jax import lax
from jax.experimental import pallas as pl
import jax.numpy as jnp
import numpy as np

from kernels.flash_attention import common
from kernels.flash_attention import gpu
from kernels.flash_attention.block_sizes import BlockSizes


def _probs(p, q, k, lse2, mask):
  """P = exp2(scale log2(e) q k^T - lse2), zero where masked.  [bq, bk] float32.

  ``lse2`` is the forward's base-2 log-sum-exp (gpu.py), computed from the same
  ``s`` as here, so P matches the forward's normalisation to rounding.
  """
  s = common.dot(q, k, trans_b=True, precision=p.precision) * (
      p.scale * common.LOG2E)
  probs = jnp.exp2(s - lse2[:, None])
  return probs if mask is None else jnp.where(mask, probs, 0.0)


def _dkv_kernel(q_ref, k_ref, v_ref, q_ids_ref, kv_ids_ref, q_bounds_ref,
                kv_bounds_ref, do_ref, lse_ref, delta_ref,  # inputs
                dk_ref, dv_ref,  # outputs
                *, p: common.Problem, block_q: int, block_k: int):
  """One (query head, batch, key tile) program.

  Refs:
    q_ref: [Lq, Dqk]; k_ref: [Lk, Dqk]; v_ref: [Lk, Dv];
    q_ids_ref: [Lq] or None; kv_ids_ref: [Lk] or None;
    q_bounds_ref: [2, nq] / kv_bounds_ref: [2, nk] or None;
    do_ref: [Lq, Dv]; lse_ref, delta_ref: [Lq];
    dk_ref: [Lk, Dqk]; dv_ref: [Lk, Dv] (this query head's share).
  """
  kv_tile = pl.program_id(2)
  kv_start = kv_tile * block_k
  k_aligned = not p.kv_padded
  k = gpu.load_rows(k_ref, kv_start, block_k, p.kv_len, k_aligned)
  v = gpu.load_rows(v_ref, kv_start, block_k, p.kv_len, k_aligned)
  cols = kv_start + jnp.arange(block_k, dtype=jnp.int32)
  kv_ids = (gpu.load_rows(kv_ids_ref, kv_start, block_k, p.kv_len, k_aligned)
            if p.has_segments else None)
  q_aligned = not p.q_padded

  def body(q_tile, carry, *, masked: bool):
    dk, dv = carry
    start = q_tile * block_q
    q = gpu.load_rows(q_ref, start, block_q, p.q_len, q_aligned)
    do = gpu.load_rows(do_ref, start, block_q, p.q_len, q_aligned)
    # Rows past the end: lse +inf => P = 0, so they add nothing.
    lse = gpu.load_rows(lse_ref, start, block_q, p.q_len, q_aligned,
                        other=np.inf)
    delta = gpu.load_rows(delta_ref, start, block_q, p.q_len, q_aligned)
    mask = None
    if masked:
      rows = start + jnp.arange(block_q, dtype=jnp.int32)
      q_ids = (gpu.load_rows(q_ids_ref, start, block_q, p.q_len, q_aligned)
               if p.has_segments else None)
      mask = common.allowed(
          p, rows[:, None], cols[None, :],
          None if kv_ids is None else q_ids[:, None],
          None if kv_ids is None else kv_ids[None, :])
    probs = _probs(p, q, k, lse, mask)  # [bq, bk]
    dv = dv + common.dot(probs.astype(do.dtype), do, trans_a=True,
                         precision=p.precision)
    dp = common.dot(do, v, trans_b=True, precision=p.precision)  # [bq, bk]
    ds = probs * (dp - delta[:, None])
    dk = dk + common.dot(ds.astype(q.dtype), q, trans_a=True,
                         precision=p.precision)
    return dk, dv

  def masked_body(q_tile, carry):
    return gpu.skip_if_apart(p, (q_bounds_ref, kv_bounds_ref), q_tile,
                             kv_tile, functools.partial(body, q_tile,
                                                        masked=True), carry)

  lo, mid = common.q_tile_range(p, kv_tile, block_q, block_k)
  num_q = p.q_len_padded // block_q
  carry = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
  carry = lax.fori_loop(lo, mid, masked_body, carry)
  dk, dv = lax.fori_loop(mid, num_q, functools.partial(body, masked=False),
                         carry)
  gpu.store_rows(dk_ref, kv_start, (dk * p.scale).astype(dk_ref.dtype),
                 p.kv_len, k_aligned)
  gpu.store_rows(dv_ref, kv_start, dv.astype(dv_ref.dtype), p.kv_len,
                 k_aligned)


def _dq_kernel(q_ref, k_ref, v_ref, q_ids_ref, kv_ids_ref, q_bounds_ref,
               kv_bounds_ref, do_ref, lse_ref, delta_ref,  # inputs
               dq_ref,  # output
               *, p: common.Problem, block_q: int, block_k: int):
  """One (head, batch, query tile) program.

  Refs:
    q_ref: [Lq, Dqk]; k_ref: [Lk, Dqk]; v_ref: [Lk, Dv];
    q_ids_ref: [Lq] or None; kv_ids_ref: [Lk] or None; *_bounds_ref as in
    the forward; do_ref: [Lq, Dv]; lse_ref, delta_ref: [Lq];
    dq_ref: [Lq, Dqk].
  """
  q_tile = gpu.query_tile(p, 2, block_q)
  q_start = q_tile * block_q
  q_aligned = not p.q_padded
  q = gpu.load_rows(q_ref, q_start, block_q, p.q_len, q_aligned)
  do = gpu.load_rows(do_ref, q_start, block_q, p.q_len, q_aligned)
  lse = gpu.load_rows(lse_ref, q_start, block_q, p.q_len, q_aligned,
                      other=np.inf)
  delta = gpu.load_rows(delta_ref, q_start, block_q, p.q_len, q_aligned)
  rows = q_start + jnp.arange(block_q, dtype=jnp.int32)
  q_ids = (gpu.load_rows(q_ids_ref, q_start, block_q, p.q_len, q_aligned)
           if p.has_segments else None)

  def body(kv_tile, dq, *, masked: bool):
    start = kv_tile * block_k
    aligned = not (masked and p.kv_padded)
    k = gpu.load_rows(k_ref, start, block_k, p.kv_len, aligned)
    mask = None
    if masked:
      cols = start + jnp.arange(block_k, dtype=jnp.int32)
      kv_ids = (gpu.load_rows(kv_ids_ref, start, block_k, p.kv_len, aligned)
                if p.has_segments else None)
      mask = common.allowed(
          p, rows[:, None], cols[None, :],
          None if q_ids is None else q_ids[:, None],
          None if q_ids is None else kv_ids[None, :])
    probs = _probs(p, q, k, lse, mask)
    v = gpu.load_rows(v_ref, start, block_k, p.kv_len, aligned)
    dp = common.dot(do, v, trans_b=True, precision=p.precision)
    ds = probs * (dp - delta[:, None])
    return dq + common.dot(ds.astype(k.dtype), k, precision=p.precision)

  def masked_body(kv_tile, dq):
    return gpu.skip_if_apart(p, (q_bounds_ref, kv_bounds_ref), q_tile,
                             kv_tile, functools.partial(body, kv_tile,
                                                        masked=True), dq)

  num_unmasked, num_total = common.kv_tile_range(p, q_tile, block_q, block_k)
  dq = jnp.zeros(q.shape, jnp.float32)
  dq = lax.fori_loop(0, num_unmasked, functools.partial(body, masked=False),
                     dq)
  dq = lax.fori_loop(num_unmasked, num_total, masked_body, dq)
  gpu.store_rows(dq_ref, q_start, (dq * p.scale).astype(dq_ref.dtype),
                 p.q_len, q_aligned)


def backward(q, k, v, q_ids, kv_ids, out, lse, dout, *, p: common.Problem,
             block_sizes: BlockSizes, interpret: bool):
  """Backward pass on unpadded lengths (head dims padded, see gpu.forward).

  Args:
    q: [B, Lq, H, Dqk]; k: [B, Lk, Hkv, Dqk]; v: [B, Lk, Hkv, Dv];
    q_ids: [B, Lq] / kv_ids: [B, Lk] int32 or None;
    out, dout: [B, Lq, H, Dv]; lse: [B, H, Lq] float32.
  Returns:
    dq [B, Lq, H, Dqk], dk [B, Lk, Hkv, Dqk], dv [B, Lk, Hkv, Dv].
  """
  batch, q_len, num_heads, head_dim = q.shape
  kv_len, num_kv_heads, head_dim_v = k.shape[1], k.shape[2], v.shape[-1]
  group = p.group
  delta = jnp.einsum("bqhd,bqhd->bhq", out.astype(jnp.float32),
                     dout.astype(jnp.float32))
  row_maps = (lambda h, b, j: (b, 0, h, 0),  # noqa: E731
              lambda h, b, j: (b, h, 0))  # noqa: E731
  kv_map = lambda h, b, j: (b, 0, common.kv_head(h, group), 0)  # noqa: E731
  ids_map = lambda h, b, j: (b, 0)  # noqa: E731
  bounds_map = lambda h, b, j: (b, 0, 0)  # noqa: E731
  # Under GQA every query head writes a float32 share of dK/dV.
  part_dtype = k.dtype if group == 1 else jnp.float32

  block_q, block_k = block_sizes.dkv
  bounds = gpu.tile_bounds(p, q_ids, kv_ids, block_q, block_k)
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, p=p, block_q=block_q, block_k=block_k),
      grid=(num_heads, batch, p.kv_len_padded // block_k),
      in_specs=[
          pl.BlockSpec((None, q_len, None, head_dim), row_maps[0]),
          pl.BlockSpec((None, kv_len, None, head_dim), kv_map),
          pl.BlockSpec((None, kv_len, None, head_dim_v), kv_map),
          None if q_ids is None else pl.BlockSpec((None, q_len), ids_map),
          None if kv_ids is None else pl.BlockSpec((None, kv_len), ids_map),
          *gpu.bounds_specs(bounds, bounds_map),
          pl.BlockSpec((None, q_len, None, head_dim_v), row_maps[0]),
          pl.BlockSpec((None, None, q_len), row_maps[1]),
          pl.BlockSpec((None, None, q_len), row_maps[1]),
      ],
      out_specs=[
          pl.BlockSpec((None, kv_len, None, head_dim), row_maps[0]),
          pl.BlockSpec((None, kv_len, None, head_dim_v), row_maps[0]),
      ],
      out_shape=[
          jax.ShapeDtypeStruct((batch, kv_len, num_heads, head_dim),
                               part_dtype),
          jax.ShapeDtypeStruct((batch, kv_len, num_heads, head_dim_v),
                               part_dtype)],
      compiler_params=gpu.compiler_params(block_sizes, block_k, block_q,
                                          max(head_dim, head_dim_v)),
      interpret=interpret,
      name="flash_attention_bwd_dkv",
  )(q, k, v, q_ids, kv_ids, *bounds, dout, lse, delta)
  if group > 1:
    fold = lambda x: x.reshape(*x.shape[:2], num_kv_heads, group,  # noqa
                               x.shape[-1]).sum(3).astype(k.dtype)
    dk, dv = fold(dk), fold(dv)

  block_q, block_k = block_sizes.dq
  bounds = gpu.tile_bounds(p, q_ids, kv_ids, block_q, block_k)
  in_specs, bounds_map = gpu.query_tile_in_specs(q, k, v, q_ids, kv_ids, group)
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, p=p, block_q=block_q, block_k=block_k),
      grid=(num_heads, batch, p.q_len_padded // block_q),
      in_specs=in_specs + gpu.bounds_specs(bounds, bounds_map) + [
          pl.BlockSpec((None, q_len, None, head_dim_v), row_maps[0]),
          pl.BlockSpec((None, None, q_len), row_maps[1]),
          pl.BlockSpec((None, None, q_len), row_maps[1]),
      ],
      out_specs=pl.BlockSpec((None, q_len, None, head_dim), row_maps[0]),
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      compiler_params=gpu.compiler_params(block_sizes, block_q, block_k,
                                          max(head_dim, head_dim_v)),
      interpret=interpret,
      name="flash_attention_bwd_dq",
  )(q, k, v, q_ids, kv_ids, *bounds, dout, lse, delta)
  return dq, dk, dv
