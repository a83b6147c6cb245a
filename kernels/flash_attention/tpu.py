"""Flash attention forward and backward, Pallas Mosaic TPU lowering.

Simpler and less tuned than the Triton path. Operands arrive padded (lengths to
the tiles, head dims to a multiple of 128 lanes) in the shared
[batch, length, heads, dim] layout and are transposed to [batch, heads, length,
dim] at this edge, because a TPU block's last two dims must be (8k, 128m)
tiles. The key/value tile is the innermost, sequential ("arbitrary") grid axis:
running statistics live in VMEM scratch across it. Causal tiles above the
diagonal are skipped with `pl.when`, and their index_map re-points at the last
useful tile so that no DMA is issued for them. Grouped-query attention maps
query head h to kv head h // group in the index_maps; the dK/dV kernel sweeps
(group, query tile) as its two sequential axes.

Row statistics are kept lane-replicated ([rows, 128]) as in JAX's TPU kernels;
the dK/dV kernel works on transposed scores (keys x queries) so that it reads
lse/delta as lane-dense rows.
"""

from __future__ import annotations

import functools

import jax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
import jax.numpy as jnp

from kernels.flash_attention import common
from kernels.flash_attention.block_sizes import BlockSizes

LANES = 128
SUBLANES = 8


def _bhld(x):
  """[B, L, H, D] -> [B, H, L, D]."""
  return jnp.swapaxes(x, 1, 2)


def _iota(shape, dim, start):
  return start + jax.lax.broadcasted_iota(jnp.int32, shape, dim)


def _kv_index(p, q_tile, kv_tile, block_q, block_k):
  """Key tile to fetch: skipped tiles re-use the last useful one (no DMA)."""
  if not p.causal:
    return kv_tile
  _, hi = common.kv_tile_range(p, q_tile, block_q, block_k)
  return jnp.maximum(jnp.minimum(kv_tile, hi - 1), 0)


def _params(n_parallel: int, n_arbitrary: int):
  return pltpu.CompilerParams(
      dimension_semantics=("parallel",) * n_parallel
      + ("arbitrary",) * n_arbitrary)


# ----------------------------------------------------------------- forward --


def _forward_kernel(q_ref, k_ref, v_ref, q_ids_ref, kv_ids_ref,  # inputs
                    o_ref, lse_ref,  # outputs
                    m_scr, l_scr, acc_scr,  # scratch
                    *, p: common.Problem, block_q: int, block_k: int):
  """Refs: q [bq, D]; k [bk, D]; v [bk, Dv]; q_ids [bq, 128]; kv_ids [8, bk];
  o [bq, Dv]; lse [bq, 128]; m, l [bq, 128]; acc [bq, Dv]."""
  q_tile, kv_tile = pl.program_id(2), pl.program_id(3)

  @pl.when(kv_tile == 0)
  def _init():
    m_scr[...] = jnp.full(m_scr.shape, common.MASK_VALUE, jnp.float32)
    l_scr[...] = jnp.zeros(l_scr.shape, jnp.float32)
    acc_scr[...] = jnp.zeros(acc_scr.shape, jnp.float32)

  def compute(masked: bool):
    s = common.dot(q_ref[...], k_ref[...], trans_b=True,
                   precision=p.precision) * p.scale
    mask = None
    if masked:
      shape = (block_q, block_k)
      mask = common.allowed(
          p, _iota(shape, 0, q_tile * block_q), _iota(shape, 1,
                                                      kv_tile * block_k),
          q_ids_ref[:, 0:1] if p.has_segments else None,
          kv_ids_ref[0:1, :] if p.has_segments else None)
      if mask is not None:  # None: nothing to mask for this problem
        s = jnp.where(mask, s, common.MASK_VALUE)
    m_prev = m_scr[:, 0:1]
    m_next = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
    alpha = jnp.exp(m_prev - m_next)
    probs = jnp.exp(s - m_next)
    if mask is not None:
      probs = jnp.where(mask, probs, 0.0)
    l_next = alpha * l_scr[:, 0:1] + jnp.sum(probs, axis=1, keepdims=True)
    m_scr[...] = jnp.broadcast_to(m_next, m_scr.shape)
    l_scr[...] = jnp.broadcast_to(l_next, l_scr.shape)
    v = v_ref[...]
    acc_scr[...] = acc_scr[...] * alpha + common.dot(
        probs.astype(v.dtype), v, precision=p.precision)

  num_unmasked, num_total = common.kv_tile_range(p, q_tile, block_q, block_k)
  pl.when(kv_tile < num_unmasked)(lambda: compute(False))
  pl.when(jnp.logical_and(kv_tile >= num_unmasked, kv_tile < num_total))(
      lambda: compute(True))

  @pl.when(kv_tile == pl.num_programs(3) - 1)
  def _finish():
    l = l_scr[:, 0:1]
    empty = l == 0.0
    l_safe = jnp.where(empty, 1.0, l)
    o_ref[...] = (acc_scr[...] / l_safe).astype(o_ref.dtype)
    lse = jnp.where(empty, jnp.inf, m_scr[:, 0:1] + jnp.log(l_safe))
    lse_ref[...] = jnp.broadcast_to(lse, lse_ref.shape)


def forward(q, k, v, q_ids, kv_ids, *, p: common.Problem,
            block_sizes: BlockSizes, interpret):
  """Padded forward pass; same contract as gpu.forward."""
  batch, q_len, num_heads, head_dim = q.shape
  kv_len, head_dim_v = k.shape[1], v.shape[-1]
  block_q, block_k = block_sizes.block_q, block_sizes.block_k
  group = p.group
  kv_index = functools.partial(_kv_index, p, block_q=block_q, block_k=block_k)
  in_specs = [
      pl.BlockSpec((None, None, block_q, head_dim),
                   lambda b, h, i, j: (b, h, i, 0)),
      pl.BlockSpec((None, None, block_k, head_dim),
                   lambda b, h, i, j: (b, common.kv_head(h, group), kv_index(i, j), 0)),
      pl.BlockSpec((None, None, block_k, head_dim_v),
                   lambda b, h, i, j: (b, common.kv_head(h, group), kv_index(i, j), 0)),
      None, None]
  if p.has_segments:
    q_ids = jax.lax.broadcast_in_dim(q_ids, (batch, q_len, LANES), (0, 1))
    kv_ids = jax.lax.broadcast_in_dim(kv_ids, (batch, SUBLANES, kv_len), (0, 2))
    in_specs[3] = pl.BlockSpec((None, block_q, LANES),
                               lambda b, h, i, j: (b, i, 0))
    in_specs[4] = pl.BlockSpec((None, SUBLANES, block_k),
                               lambda b, h, i, j: (b, 0, kv_index(i, j)))
  out, lse = pl.pallas_call(
      functools.partial(_forward_kernel, p=p, block_q=block_q,
                        block_k=block_k),
      grid=(batch, num_heads, q_len // block_q, kv_len // block_k),
      in_specs=in_specs,
      out_specs=[
          pl.BlockSpec((None, None, block_q, head_dim_v),
                       lambda b, h, i, j: (b, h, i, 0)),
          pl.BlockSpec((None, None, block_q, LANES),
                       lambda b, h, i, j: (b, h, i, 0)),
      ],
      out_shape=[
          jax.ShapeDtypeStruct((batch, num_heads, q_len, head_dim_v), q.dtype),
          jax.ShapeDtypeStruct((batch, num_heads, q_len, LANES), jnp.float32),
      ],
      scratch_shapes=[pltpu.VMEM((block_q, LANES), jnp.float32),
                      pltpu.VMEM((block_q, LANES), jnp.float32),
                      pltpu.VMEM((block_q, head_dim_v), jnp.float32)],
      compiler_params=_params(3, 1),
      interpret=interpret,
      name="flash_attention_fwd_tpu",
  )(_bhld(q), _bhld(k), _bhld(v), q_ids, kv_ids)
  return _bhld(out), lse[..., 0]


# ---------------------------------------------------------------- backward --


def _dkv_kernel(q_ref, k_ref, v_ref, q_ids_ref, kv_ids_ref, do_ref, lse_ref,
                delta_ref,  # inputs
                dk_ref, dv_ref,  # outputs
                dk_scr, dv_scr,  # scratch
                *, p: common.Problem, block_q: int, block_k: int):
  """Transposed scores (keys x queries). Refs: q [bq, D]; k [bk, D];
  v [bk, Dv]; q_ids [8, bq]; kv_ids [bk, 128]; do [bq, Dv]; lse, delta [1, bq];
  dk [bk, D]; dv [bk, Dv]."""
  kv_tile, g, q_tile = pl.program_id(2), pl.program_id(3), pl.program_id(4)

  @pl.when(jnp.logical_and(g == 0, q_tile == 0))
  def _init():
    dk_scr[...] = jnp.zeros(dk_scr.shape, jnp.float32)
    dv_scr[...] = jnp.zeros(dv_scr.shape, jnp.float32)

  def compute(masked: bool):
    q, k, v, do = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
    s_t = common.dot(k, q, trans_b=True,
                     precision=p.precision) * p.scale  # [bk, bq]
    probs_t = jnp.exp(s_t - lse_ref[...])
    if masked:
      shape = (block_k, block_q)
      mask_t = common.allowed(
          p, _iota(shape, 1, q_tile * block_q), _iota(shape, 0,
                                                      kv_tile * block_k),
          q_ids_ref[0:1, :] if p.has_segments else None,
          kv_ids_ref[:, 0:1] if p.has_segments else None)
      if mask_t is not None:
        probs_t = jnp.where(mask_t, probs_t, 0.0)
    dv_scr[...] += common.dot(probs_t.astype(do.dtype), do,
                              precision=p.precision)
    dp_t = common.dot(v, do, trans_b=True, precision=p.precision)  # [bk, bq]
    ds_t = probs_t * (dp_t - delta_ref[...])
    dk_scr[...] += common.dot(ds_t.astype(q.dtype), q,
                              precision=p.precision)

  lo, mid = common.q_tile_range(p, kv_tile, block_q, block_k)
  pl.when(jnp.logical_and(q_tile >= lo, q_tile < mid))(lambda: compute(True))
  pl.when(q_tile >= mid)(lambda: compute(False))

  @pl.when(jnp.logical_and(g == pl.num_programs(3) - 1,
                           q_tile == pl.num_programs(4) - 1))
  def _finish():
    dk_ref[...] = (dk_scr[...] * p.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv_scr[...].astype(dv_ref.dtype)


def _dq_kernel(q_ref, k_ref, v_ref, q_ids_ref, kv_ids_ref, do_ref, lse_ref,
               delta_ref,  # inputs
               dq_ref,  # output
               dq_scr,  # scratch
               *, p: common.Problem, block_q: int, block_k: int):
  """Refs: q [bq, D]; k [bk, D]; v [bk, Dv]; q_ids [bq, 128]; kv_ids [8, bk];
  do [bq, Dv]; lse, delta [bq, 128]; dq [bq, D]."""
  q_tile, kv_tile = pl.program_id(2), pl.program_id(3)

  @pl.when(kv_tile == 0)
  def _init():
    dq_scr[...] = jnp.zeros(dq_scr.shape, jnp.float32)

  def compute(masked: bool):
    k = k_ref[...]
    s = common.dot(q_ref[...], k, trans_b=True,
                   precision=p.precision) * p.scale
    probs = jnp.exp(s - lse_ref[:, 0:1])
    if masked:
      shape = (block_q, block_k)
      mask = common.allowed(
          p, _iota(shape, 0, q_tile * block_q), _iota(shape, 1,
                                                      kv_tile * block_k),
          q_ids_ref[:, 0:1] if p.has_segments else None,
          kv_ids_ref[0:1, :] if p.has_segments else None)
      if mask is not None:
        probs = jnp.where(mask, probs, 0.0)
    dp = common.dot(do_ref[...], v_ref[...], trans_b=True,
                    precision=p.precision)
    ds = probs * (dp - delta_ref[:, 0:1])
    dq_scr[...] += common.dot(ds.astype(k.dtype), k, precision=p.precision)

  num_unmasked, num_total = common.kv_tile_range(p, q_tile, block_q, block_k)
  pl.when(kv_tile < num_unmasked)(lambda: compute(False))
  pl.when(jnp.logical_and(kv_tile >= num_unmasked, kv_tile < num_total))(
      lambda: compute(True))

  @pl.when(kv_tile == pl.num_programs(3) - 1)
  def _finish():
    dq_ref[...] = (dq_scr[...] * p.scale).astype(dq_ref.dtype)


def backward(q, k, v, q_ids, kv_ids, out, lse, dout, *, p: common.Problem,
             block_sizes: BlockSizes, interpret):
  """Padded backward pass; same contract as gpu_vjp.backward."""
  batch, q_len, num_heads, head_dim = q.shape
  kv_len, num_kv_heads, head_dim_v = k.shape[1], k.shape[2], v.shape[-1]
  group = p.group
  delta = jnp.einsum("blhd,blhd->bhl", out.astype(jnp.float32),
                     dout.astype(jnp.float32))  # [B, H, Lq]
  q_t, k_t, v_t, do_t = _bhld(q), _bhld(k), _bhld(v), _bhld(dout)

  # dK/dV: grid (batch, kv head, key tile, group member, query tile).
  block_q, block_k = block_sizes.dkv

  def q_index(j, i):  # skipped query tiles re-use the first useful one
    lo, _ = common.q_tile_range(p, j, block_q, block_k)
    return jnp.maximum(i, jnp.minimum(lo, q_len // block_q - 1))

  q_spec = lambda d: pl.BlockSpec(  # noqa: E731
      (None, None, block_q, d),
      lambda b, h, j, g, i: (b, h * group + g, q_index(j, i), 0))
  kv_spec = lambda d: pl.BlockSpec(  # noqa: E731
      (None, None, block_k, d), lambda b, h, j, g, i: (b, h, j, 0))
  row_spec = pl.BlockSpec((None, None, 1, block_q),
                          lambda b, h, j, g, i: (b, h * group + g, 0,
                                                 q_index(j, i)))
  in_specs = [q_spec(head_dim), kv_spec(head_dim), kv_spec(head_dim_v),
              None, None, q_spec(head_dim_v), row_spec, row_spec]
  q_ids_t = kv_ids_t = None
  if p.has_segments:
    q_ids_t = jax.lax.broadcast_in_dim(q_ids, (batch, SUBLANES, q_len), (0, 2))
    kv_ids_t = jax.lax.broadcast_in_dim(kv_ids, (batch, kv_len, LANES), (0, 1))
    in_specs[3] = pl.BlockSpec((None, SUBLANES, block_q),
                               lambda b, h, j, g, i: (b, 0, q_index(j, i)))
    in_specs[4] = pl.BlockSpec((None, block_k, LANES),
                               lambda b, h, j, g, i: (b, j, 0))
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, p=p, block_q=block_q, block_k=block_k),
      grid=(batch, num_kv_heads, kv_len // block_k, group, q_len // block_q),
      in_specs=in_specs,
      out_specs=[kv_spec(head_dim), kv_spec(head_dim_v)],
      out_shape=[jax.ShapeDtypeStruct(k_t.shape, k.dtype),
                 jax.ShapeDtypeStruct(v_t.shape, v.dtype)],
      scratch_shapes=[pltpu.VMEM((block_k, head_dim), jnp.float32),
                      pltpu.VMEM((block_k, head_dim_v), jnp.float32)],
      compiler_params=_params(3, 2),
      interpret=interpret,
      name="flash_attention_bwd_dkv_tpu",
  )(q_t, k_t, v_t, q_ids_t, kv_ids_t, do_t, lse[:, :, None, :],
    delta[:, :, None, :])

  # dQ: grid (batch, head, query tile, key tile).
  block_q, block_k = block_sizes.dq
  kv_index = functools.partial(_kv_index, p, block_q=block_q, block_k=block_k)
  lanes = lambda x: jax.lax.broadcast_in_dim(  # noqa: E731
      x, (*x.shape, LANES), (0, 1, 2))
  q_spec = lambda d: pl.BlockSpec(  # noqa: E731
      (None, None, block_q, d), lambda b, h, i, j: (b, h, i, 0))
  kv_spec = lambda d: pl.BlockSpec(  # noqa: E731
      (None, None, block_k, d),
      lambda b, h, i, j: (b, common.kv_head(h, group), kv_index(i, j), 0))
  in_specs = [q_spec(head_dim), kv_spec(head_dim), kv_spec(head_dim_v),
              None, None, q_spec(head_dim_v), q_spec(LANES), q_spec(LANES)]
  q_ids_b = kv_ids_b = None
  if p.has_segments:
    q_ids_b = jax.lax.broadcast_in_dim(q_ids, (batch, q_len, LANES), (0, 1))
    kv_ids_b = jax.lax.broadcast_in_dim(kv_ids, (batch, SUBLANES, kv_len),
                                        (0, 2))
    in_specs[3] = pl.BlockSpec((None, block_q, LANES),
                               lambda b, h, i, j: (b, i, 0))
    in_specs[4] = pl.BlockSpec((None, SUBLANES, block_k),
                               lambda b, h, i, j: (b, 0, kv_index(i, j)))
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, p=p, block_q=block_q, block_k=block_k),
      grid=(batch, num_heads, q_len // block_q, kv_len // block_k),
      in_specs=in_specs,
      out_specs=q_spec(head_dim),
      out_shape=jax.ShapeDtypeStruct(q_t.shape, q.dtype),
      scratch_shapes=[pltpu.VMEM((block_q, head_dim), jnp.float32)],
      compiler_params=_params(3, 1),
      interpret=interpret,
      name="flash_attention_bwd_dq_tpu",
  )(q_t, k_t, v_t, q_ids_b, kv_ids_b, do_t, lanes(lse), lanes(delta))
  return _bhld(dq), _bhld(dk), _bhld(dv)
