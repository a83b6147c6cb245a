"""Flash attention backward pass, Pallas Triton lowering (FlashAttention-2).

Three kernels, all on padded operands (see gpu.py):
  1. preprocess: delta = rowsum(dO * O), float32 [B, H, Lq];
  2. dK/dV: one program per (key tile, batch, kv head) loops over the `group`
     query heads that share the kv head and over the query tiles that can see
     the key tile, accumulating dK and dV in registers (no atomics, no
     per-query-head dK copies);
  3. dQ: one program per (query tile, batch, head) loops over key tiles.
With s = scale * q.k and P = exp(s - lse):
  dV = P^T dO,  dP = dO V^T,  dS = P * (dP - delta),  dQ = scale dS K,
  dK = scale dS^T Q.
"""

from __future__ import annotations

import functools

import jax
from jax import lax
from jax.experimental import pallas as pl
import jax.numpy as jnp

from kernels.flash_attention import common
from kernels.flash_attention import gpu
from kernels.flash_attention.block_sizes import BlockSizes


def _preprocess_kernel(o_ref, do_ref, delta_ref):
  o = o_ref[...].astype(jnp.float32)
  do = do_ref[...].astype(jnp.float32)
  delta_ref[...] = jnp.sum(o * do, axis=1)


def preprocess(out, dout, *, block_q: int, interpret: bool):
  """delta = rowsum(dO * O): out, dout [B, Lq, H, Dv] -> [B, H, Lq] float32."""
  batch, q_len, num_heads, head_dim_v = out.shape
  spec = pl.BlockSpec((None, block_q, None, head_dim_v),
                      lambda i, b, h: (b, i, h, 0))
  return pl.pallas_call(
      _preprocess_kernel,
      grid=(q_len // block_q, batch, num_heads),
      in_specs=[spec, spec],
      out_specs=pl.BlockSpec((None, None, block_q), lambda i, b, h: (b, h, i)),
      out_shape=jax.ShapeDtypeStruct((batch, num_heads, q_len), jnp.float32),
      compiler_params=gpu.compiler_params(BlockSizes(num_warps=4),
                                          head_dim_v, big_tiles=False),
      interpret=interpret,
      name="flash_attention_bwd_preprocess",
  )(out, dout)


def _probs(p, q, k, lse, mask):
  """P = exp(scale * q k^T - lse), zero where masked.  [bq, bk] float32."""
  s = common.dot(q, k, trans_b=True) * (p.scale * common.LOG2E)
  probs = jnp.exp2(s - (lse * common.LOG2E)[:, None])
  return probs if mask is None else jnp.where(mask, probs, 0.0)


def _dkv_kernel(q_ref, k_ref, v_ref, q_ids_ref, kv_ids_ref, do_ref, lse_ref,
                delta_ref,  # inputs
                dk_ref, dv_ref,  # outputs
                *, p: common.Problem, block_q: int, block_k: int):
  """One (key tile, batch, kv head) program.

  Refs:
    q_ref: [Lq, group, Dqk]; k_ref: [block_k, Dqk]; v_ref: [block_k, Dv];
    q_ids_ref: [Lq] or None; kv_ids_ref: [block_k] or None;
    do_ref: [Lq, group, Dv]; lse_ref, delta_ref: [group, Lq];
    dk_ref: [block_k, Dqk]; dv_ref: [block_k, Dv].
  """
  kv_tile = pl.program_id(0)
  k = k_ref[...]
  v = v_ref[...]
  cols = kv_tile * block_k + jnp.arange(block_k, dtype=jnp.int32)
  kv_ids = kv_ids_ref[...] if p.has_segments else None

  def body(q_tile, carry, *, g, masked: bool):
    dk, dv = carry
    qs = pl.ds(q_tile * block_q, block_q)
    q = q_ref[qs, g, :]
    do = do_ref[qs, g, :]
    mask = None
    if masked:
      rows = q_tile * block_q + jnp.arange(block_q, dtype=jnp.int32)
      mask = common.allowed(
          p, rows[:, None], cols[None, :],
          None if kv_ids is None else q_ids_ref[qs][:, None],
          None if kv_ids is None else kv_ids[None, :])
    probs = _probs(p, q, k, lse_ref[g, qs], mask)  # [bq, bk]
    dv = dv + common.dot(probs.astype(do.dtype), do, trans_a=True)
    dp = common.dot(do, v, trans_b=True)  # [bq, bk]
    ds = probs * (dp - delta_ref[g, qs][:, None])
    dk = dk + common.dot(ds.astype(q.dtype), q, trans_a=True)
    return dk, dv

  lo, mid = common.q_tile_range(p, kv_tile, block_q, block_k)
  num_q = p.q_len_padded // block_q

  def group_body(g, carry):
    carry = lax.fori_loop(lo, mid, functools.partial(body, g=g, masked=True),
                          carry)
    return lax.fori_loop(mid, num_q, functools.partial(body, g=g,
                                                       masked=False), carry)

  carry = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
  if p.group == 1:
    dk, dv = group_body(0, carry)
  else:
    dk, dv = lax.fori_loop(0, p.group, group_body, carry)
  dk_ref[...] = (dk * p.scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def _dq_kernel(q_ref, k_ref, v_ref, q_ids_ref, kv_ids_ref, do_ref, lse_ref,
               delta_ref,  # inputs
               dq_ref,  # output
               *, p: common.Problem, block_q: int, block_k: int):
  """One (query tile, batch, head) program.

  Refs:
    q_ref: [block_q, Dqk]; k_ref: [Lk, Dqk]; v_ref: [Lk, Dv];
    q_ids_ref: [block_q] or None; kv_ids_ref: [Lk] or None;
    do_ref: [block_q, Dv]; lse_ref, delta_ref: [block_q]; dq_ref: [block_q, Dqk].
  """
  q_tile = pl.program_id(0)
  q = q_ref[...]
  do = do_ref[...]
  lse = lse_ref[...]
  delta = delta_ref[...]
  rows = q_tile * block_q + jnp.arange(block_q, dtype=jnp.int32)
  q_ids = q_ids_ref[...] if p.has_segments else None

  def body(kv_tile, dq, *, masked: bool):
    ks = pl.ds(kv_tile * block_k, block_k)
    k = k_ref[ks, :]
    mask = None
    if masked:
      cols = kv_tile * block_k + jnp.arange(block_k, dtype=jnp.int32)
      mask = common.allowed(
          p, rows[:, None], cols[None, :],
          None if q_ids is None else q_ids[:, None],
          None if q_ids is None else kv_ids_ref[ks][None, :])
    probs = _probs(p, q, k, lse, mask)
    dp = common.dot(do, v_ref[ks, :], trans_b=True)
    ds = probs * (dp - delta[:, None])
    return dq + common.dot(ds.astype(k.dtype), k)

  num_unmasked, num_total = common.kv_tile_range(p, q_tile, block_q, block_k)
  dq = jnp.zeros(q.shape, jnp.float32)
  dq = lax.fori_loop(0, num_unmasked, functools.partial(body, masked=False),
                     dq)
  dq = lax.fori_loop(num_unmasked, num_total,
                     functools.partial(body, masked=True), dq)
  dq_ref[...] = (dq * p.scale).astype(dq_ref.dtype)


def backward(q, k, v, q_ids, kv_ids, out, lse, dout, *, p: common.Problem,
             block_sizes: BlockSizes, interpret: bool):
  """Padded backward pass.

  Args:
    q: [B, Lq, H, Dqk]; k: [B, Lk, Hkv, Dqk]; v: [B, Lk, Hkv, Dv];
    q_ids: [B, Lq] / kv_ids: [B, Lk] int32 or None;
    out, dout: [B, Lq, H, Dv]; lse: [B, H, Lq] float32 (+inf on padded rows).
  Returns:
    dq [B, Lq, H, Dqk], dk [B, Lk, Hkv, Dqk], dv [B, Lk, Hkv, Dv].
  """
  batch, q_len, num_heads, head_dim = q.shape
  kv_len, num_kv_heads, head_dim_v = k.shape[1], k.shape[2], v.shape[-1]
  group = p.group
  delta = preprocess(out, dout, block_q=block_sizes.block_q,
                     interpret=interpret)

  # dK/dV: query-side operands viewed as [B, Lq, Hkv, group, D] (free reshape).
  block_q, block_k = block_sizes.dkv
  q5 = q.reshape(batch, q_len, num_kv_heads, group, head_dim)
  do5 = dout.reshape(batch, q_len, num_kv_heads, group, head_dim_v)
  lse4 = lse.reshape(batch, num_kv_heads, group, q_len)
  delta4 = delta.reshape(batch, num_kv_heads, group, q_len)
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, p=p, block_q=block_q, block_k=block_k),
      grid=(kv_len // block_k, batch, num_kv_heads),
      in_specs=[
          pl.BlockSpec((None, q_len, None, group, head_dim),
                       lambda j, b, h: (b, 0, h, 0, 0)),
          pl.BlockSpec((None, block_k, None, head_dim),
                       lambda j, b, h: (b, j, h, 0)),
          pl.BlockSpec((None, block_k, None, head_dim_v),
                       lambda j, b, h: (b, j, h, 0)),
          None if q_ids is None else pl.BlockSpec((None, q_len),
                                                  lambda j, b, h: (b, 0)),
          None if kv_ids is None else pl.BlockSpec((None, block_k),
                                                   lambda j, b, h: (b, j)),
          pl.BlockSpec((None, q_len, None, group, head_dim_v),
                       lambda j, b, h: (b, 0, h, 0, 0)),
          pl.BlockSpec((None, None, group, q_len), lambda j, b, h: (b, h, 0, 0)),
          pl.BlockSpec((None, None, group, q_len), lambda j, b, h: (b, h, 0, 0)),
      ],
      out_specs=[
          pl.BlockSpec((None, block_k, None, head_dim),
                       lambda j, b, h: (b, j, h, 0)),
          pl.BlockSpec((None, block_k, None, head_dim_v),
                       lambda j, b, h: (b, j, h, 0)),
      ],
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype),
                 jax.ShapeDtypeStruct(v.shape, v.dtype)],
      compiler_params=gpu.compiler_params(
          block_sizes, head_dim, big_tiles=block_q * block_k >= 128 * 128),
      interpret=interpret,
      name="flash_attention_bwd_dkv",
  )(q5, k, v, q_ids, kv_ids, do5, lse4, delta4)

  block_q, block_k = block_sizes.dq
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, p=p, block_q=block_q, block_k=block_k),
      grid=(q_len // block_q, batch, num_heads),
      in_specs=gpu.query_tile_in_specs(block_q, kv_len, head_dim, head_dim_v, group,
                                       q_ids, kv_ids) + [
          pl.BlockSpec((None, block_q, None, head_dim_v),
                       lambda i, b, h: (b, i, h, 0)),
          pl.BlockSpec((None, None, block_q), lambda i, b, h: (b, h, i)),
          pl.BlockSpec((None, None, block_q), lambda i, b, h: (b, h, i)),
      ],
      out_specs=pl.BlockSpec((None, block_q, None, head_dim),
                             lambda i, b, h: (b, i, h, 0)),
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      compiler_params=gpu.compiler_params(
          block_sizes, head_dim, big_tiles=block_q * block_k >= 128 * 128),
      interpret=interpret,
      name="flash_attention_bwd_dq",
  )(q, k, v, q_ids, kv_ids, dout, lse, delta)
  return dq, dk, dv
