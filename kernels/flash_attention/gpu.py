"""Flash attention forward pass, Pallas Triton lowering (NVIDIA/AMD GPUs).

Operates on padded operands (see api.py): every length a multiple of its tiles,
head dims padded to a power of two. Layout stays [batch, length, heads, dim]:
a program reads its (query tile, head) slab straight from HBM, grouped-query
attention maps query head h to key/value head h // group in the index_map (no
repeat of K/V), and the forward saves the natural-log log-sum-exp of the scaled
logits per row for the backward pass (+inf for rows with no allowed key).
"""

from __future__ import annotations

import functools

import jax
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
import jax.numpy as jnp

from kernels.flash_attention import common
from kernels.flash_attention.block_sizes import BlockSizes


def compiler_params(block_sizes: BlockSizes, head_dim: int, *,
                    big_tiles: bool):
  """Triton launch parameters; passing them selects the Triton lowering."""
  num_warps = block_sizes.num_warps
  if num_warps is None:
    num_warps = 8 if (head_dim > 64 and big_tiles) else 4
  return plgpu.CompilerParams(num_warps=num_warps,
                              num_stages=block_sizes.num_stages or 2)


def _forward_kernel(q_ref, k_ref, v_ref, q_ids_ref, kv_ids_ref,  # inputs
                    o_ref, lse_ref,  # outputs
                    *, p: common.Problem, block_q: int, block_k: int):
  """One (query tile, batch, head) program.

  Refs:
    q_ref: [block_q, Dqk]; k_ref: [Lk, Dqk]; v_ref: [Lk, Dv];
    q_ids_ref: [block_q] or None; kv_ids_ref: [Lk] or None;
    o_ref: [block_q, Dv]; lse_ref: [block_q] float32.
  """
  q_tile = pl.program_id(0)
  q = q_ref[...]
  rows = q_tile * block_q + jnp.arange(block_q, dtype=jnp.int32)
  q_ids = q_ids_ref[...] if p.has_segments else None
  qk_scale = p.scale * common.LOG2E  # work in base 2: exp2 is cheaper

  def body(kv_tile, carry, *, masked: bool):
    acc, m_prev, l_prev = carry
    ks = pl.ds(kv_tile * block_k, block_k)
    s = common.dot(q, k_ref[ks, :], trans_b=True) * qk_scale  # [bq, bk]
    mask = None
    if masked:
      cols = kv_tile * block_k + jnp.arange(block_k, dtype=jnp.int32)
      mask = common.allowed(
          p, rows[:, None], cols[None, :],
          None if q_ids is None else q_ids[:, None],
          None if q_ids is None else kv_ids_ref[ks][None, :])
      if mask is not None:  # None: nothing to mask for this problem
        s = jnp.where(mask, s, common.MASK_VALUE)
    m_next = jnp.maximum(m_prev, jnp.max(s, axis=1))
    alpha = jnp.exp2(m_prev - m_next)
    probs = jnp.exp2(s - m_next[:, None])
    if mask is not None:  # a fully masked row must contribute nothing
      probs = jnp.where(mask, probs, 0.0)
    l_next = alpha * l_prev + jnp.sum(probs, axis=1)
    v = v_ref[ks, :]
    acc = acc * alpha[:, None] + common.dot(probs.astype(v.dtype), v)
    return acc, m_next, l_next

  carry = (jnp.zeros((block_q, v_ref.shape[-1]), jnp.float32),
           jnp.full((block_q,), common.MASK_VALUE, jnp.float32),
           jnp.zeros((block_q,), jnp.float32))
  num_unmasked, num_total = common.kv_tile_range(p, q_tile, block_q, block_k)
  carry = lax.fori_loop(0, num_unmasked,
                        functools.partial(body, masked=False), carry)
  acc, m, l = lax.fori_loop(num_unmasked, num_total,
                            functools.partial(body, masked=True), carry)
  empty = l == 0.0  # no allowed key: output zeros, lse +inf (=> p = 0 in bwd)
  l_safe = jnp.where(empty, 1.0, l)
  o_ref[...] = (acc / l_safe[:, None]).astype(o_ref.dtype)
  lse_ref[...] = jnp.where(empty, jnp.inf, m * common.LN2 + jnp.log(l_safe))


def query_tile_in_specs(block_q: int, kv_len: int, head_dim: int, head_dim_v: int,
                        group: int, q_ids, kv_ids) -> list:
  """Input specs of a kernel run per (query tile i, batch b, head h): the forward and dQ.

  One query tile ``[block_q, Dqk]`` of head h, the whole key/value sequence of its kv
  head (``h // group``), and the matching segment ids (``None`` where absent).
  """
  kv_map = lambda i, b, h: (b, 0, common.kv_head(h, group), 0)  # noqa: E731
  return [
      pl.BlockSpec((None, block_q, None, head_dim), lambda i, b, h: (b, i, h, 0)),
      pl.BlockSpec((None, kv_len, None, head_dim), kv_map),
      pl.BlockSpec((None, kv_len, None, head_dim_v), kv_map),
      None if q_ids is None else pl.BlockSpec((None, block_q), lambda i, b, h: (b, i)),
      None if kv_ids is None else pl.BlockSpec((None, kv_len), lambda i, b, h: (b, 0)),
  ]


def forward(q, k, v, q_ids, kv_ids, *, p: common.Problem,
            block_sizes: BlockSizes, interpret: bool):
  """Padded forward pass.

  Args:
    q: [B, Lq_pad, H, Dqk]; k: [B, Lk_pad, Hkv, Dqk]; v: [B, Lk_pad, Hkv, Dv].
    q_ids: int32 [B, Lq_pad] or None; kv_ids: int32 [B, Lk_pad] or None.
  Returns:
    out [B, Lq_pad, H, Dv] (q.dtype), lse [B, H, Lq_pad] float32.
  """
  batch, q_len, num_heads, head_dim = q.shape
  kv_len, head_dim_v = k.shape[1], v.shape[-1]
  block_q, block_k = block_sizes.block_q, block_sizes.block_k
  group = p.group
  grid = (q_len // block_q, batch, num_heads)
  in_specs = query_tile_in_specs(block_q, kv_len, head_dim, head_dim_v, group,
                                 q_ids, kv_ids)
  out_specs = [
      pl.BlockSpec((None, block_q, None, head_dim_v),
                   lambda i, b, h: (b, i, h, 0)),
      pl.BlockSpec((None, None, block_q), lambda i, b, h: (b, h, i)),
  ]
  out_shape = [
      jax.ShapeDtypeStruct((batch, q_len, num_heads, head_dim_v), q.dtype),
      jax.ShapeDtypeStruct((batch, num_heads, q_len), jnp.float32),
  ]
  kernel = functools.partial(_forward_kernel, p=p, block_q=block_q,
                             block_k=block_k)
  out, lse = pl.pallas_call(
      kernel,
      grid=grid,
      in_specs=in_specs,
      out_specs=out_specs,
      out_shape=out_shape,
      compiler_params=compiler_params(block_sizes, head_dim, big_tiles=True),
      interpret=interpret,
      name="flash_attention_fwd",
  )(q, k, v, q_ids, kv_ids)
  return out, lse
