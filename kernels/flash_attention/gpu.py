"""Flash attention forward pass, Pallas Triton lowering (NVIDIA/AMD GPUs).

Operands keep their real lengths: a tile that runs past the end is read with
a masked load (`plgpu.load(..., mask=...)`, zeros outside) and written with a
masked store, so no padded copy of Q/K/V is made. Only head dims are padded
(to a power of two, a Triton tensor rule; see api.py). Layout stays
[batch, length, heads, dim]: grouped-query attention maps query head h to
key/value head h // group in the index_map (no repeat of K/V), and the
forward saves the base-2 log-sum-exp of the scaled logits per row (log2 of
sum 2^(s log2 e), in the units its running max works in) for the backward pass
(+inf for rows with no allowed key). Base 2, not natural: converting the running
max to natural log and back in the backward (m ln 2 log2 e) rounded the exponent
of every P by up to an ulp of m, a systematic relative error in each row that
reached dV at float32 (issue 18: tokamax's small_sequences case).

Scheduling: the grid is (query head, batch, query tile). The fastest axis is
the head, so neighbouring programs of one GQA group read the same K/V (L2
reuse); the slowest is the query tile, taken in reverse under `causal`, so
the heaviest tiles (most keys) start first and the light ones fill the tail.
Tiles fully masked by causality are never visited; with segment ids, key
tiles whose id range misses the query tile's are skipped
(`common.tiles_meet`, from per-tile min/max ids computed once in XLA).
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


def num_warps(block_sizes: BlockSizes, rows: int, cols: int,
              head_dim: int) -> int:
  """Warps per program for a kernel whose register tiles are [rows, cols]
  scores and [rows, head_dim] accumulators: more warps for bigger tiles, so
  that each warp keeps about 16 x 64 to 16 x 128 elements of each tile
  (FlashAttention-2's choice: 4 warps at 128 x 64, 8 at 128 x 128)."""
  if block_sizes.num_warps is not None:
    return block_sizes.num_warps
  work = rows * max(cols, head_dim)
  return 2 if work <= 32 * 64 else 4 if work <= 64 * 128 else 8


def compiler_params(block_sizes: BlockSizes, rows: int, cols: int,
                    head_dim: int):
  """Triton launch parameters; passing them selects the Triton lowering."""
  return plgpu.CompilerParams(
      num_warps=num_warps(block_sizes, rows, cols, head_dim),
      num_stages=block_sizes.num_stages or 2)


def load_rows(ref, start, size: int, length: int, aligned: bool, other=0):
  """ref[start:start + size] along the leading axis; rows >= length (past the
  real end of the sequence) read as `other` through a masked load."""
  view = ref.at[pl.ds(start, size)]
  if aligned:
    return view[...]
  valid = start + jnp.arange(size, dtype=jnp.int32) < length
  shape = (size, *ref.shape[1:])
  mask = jnp.broadcast_to(valid.reshape((size,) + (1,) * (len(shape) - 1)),
                          shape)
  return plgpu.load(view, mask=mask, other=other)


def store_rows(ref, start, value, length: int, aligned: bool):
  """ref[start:start + rows] = value, dropping rows >= length."""
  size = value.shape[0]
  view = ref.at[pl.ds(start, size)]
  if aligned:
    view[...] = value
    return
  valid = start + jnp.arange(size, dtype=jnp.int32) < length
  mask = jnp.broadcast_to(
      valid.reshape((size,) + (1,) * (value.ndim - 1)), value.shape)
  plgpu.store(view, value, mask=mask)


def query_tile(p: common.Problem, axis: int, block_q: int):
  """This program's query tile: reversed under causal (heavy tiles first)."""
  i = pl.program_id(axis)
  return p.q_len_padded // block_q - 1 - i if p.causal else i


def skip_if_apart(p: common.Problem, bounds, q_tile, kv_tile, body, carry):
  """body(carry), or carry unchanged when the tiles share no segment id."""
  if not p.has_segments:
    return body(carry)
  q_bounds_ref, kv_bounds_ref = bounds
  return lax.cond(common.tiles_meet(q_bounds_ref, q_tile, kv_bounds_ref,
                                    kv_tile), body, lambda c: c, carry)


def _forward_kernel(q_ref, k_ref, v_ref, q_ids_ref, kv_ids_ref, q_bounds_ref,
                    kv_bounds_ref,  # inputs
                    o_ref, lse_ref,  # outputs
                    *, p: common.Problem, block_q: int, block_k: int):
  """One (head, batch, query tile) program.

  Refs:
    q_ref: [Lq, Dqk]; k_ref: [Lk, Dqk]; v_ref: [Lk, Dv];
    q_ids_ref: [Lq] or None; kv_ids_ref: [Lk] or None;
    q_bounds_ref: [2, nq] / kv_bounds_ref: [2, nk] per-tile (min, max) ids,
    or None; o_ref: [Lq, Dv]; lse_ref: [Lq] float32.
  """
  q_tile = query_tile(p, 2, block_q)
  q_start = q_tile * block_q
  q = load_rows(q_ref, q_start, block_q, p.q_len, not p.q_padded)
  rows = q_start + jnp.arange(block_q, dtype=jnp.int32)
  q_ids = (load_rows(q_ids_ref, q_start, block_q, p.q_len, not p.q_padded)
           if p.has_segments else None)
  qk_scale = p.scale * common.LOG2E  # work in base 2: exp2 is cheaper

  def body(kv_tile, carry, *, masked: bool):
    acc, m_prev, l_prev = carry
    start = kv_tile * block_k
    # Only the masked range holds the tile that runs past the keys' end.
    aligned = not (masked and p.kv_padded)
    k = load_rows(k_ref, start, block_k, p.kv_len, aligned)
    s = common.dot(q, k, trans_b=True, precision=p.precision) * qk_scale
    mask = None
    if masked:
      cols = start + jnp.arange(block_k, dtype=jnp.int32)
      kv_ids = (load_rows(kv_ids_ref, start, block_k, p.kv_len, aligned)
                if p.has_segments else None)
      mask = common.allowed(
          p, rows[:, None], cols[None, :],
          None if q_ids is None else q_ids[:, None],
          None if q_ids is None else kv_ids[None, :])
      if mask is not None:  # None: nothing to mask for this problem
        s = jnp.where(mask, s, common.MASK_VALUE)
    m_next = jnp.maximum(m_prev, jnp.max(s, axis=1))
    alpha = jnp.exp2(m_prev - m_next)
    probs = jnp.exp2(s - m_next[:, None])
    if mask is not None:  # a fully masked row must contribute nothing
      probs = jnp.where(mask, probs, 0.0)
    l_next = alpha * l_prev + jnp.sum(probs, axis=1)
    v = load_rows(v_ref, start, block_k, p.kv_len, aligned)
    acc = acc * alpha[:, None] + common.dot(probs.astype(v.dtype), v,
                                            precision=p.precision)
    return acc, m_next, l_next

  def masked_body(kv_tile, carry):
    return skip_if_apart(p, (q_bounds_ref, kv_bounds_ref), q_tile, kv_tile,
                         functools.partial(body, kv_tile, masked=True), carry)

  carry = (jnp.zeros((block_q, v_ref.shape[-1]), jnp.float32),
           jnp.full((block_q,), common.MASK_VALUE, jnp.float32),
           jnp.zeros((block_q,), jnp.float32))
  num_unmasked, num_total = common.kv_tile_range(p, q_tile, block_q, block_k)
  carry = lax.fori_loop(0, num_unmasked,
                        functools.partial(body, masked=False), carry)
  acc, m, l = lax.fori_loop(num_unmasked, num_total, masked_body, carry)
  empty = l == 0.0  # no allowed key: output zeros, lse +inf (=> p = 0 in bwd)
  l_safe = jnp.where(empty, 1.0, l)
  store_rows(o_ref, q_start, (acc / l_safe[:, None]).astype(o_ref.dtype),
             p.q_len, not p.q_padded)
  store_rows(lse_ref, q_start,
             jnp.where(empty, jnp.inf, m + jnp.log2(l_safe)),
             p.q_len, not p.q_padded)


def query_tile_in_specs(q, k, v, q_ids, kv_ids, group: int) -> list:
  """Input specs of a kernel run per (head h, batch b, query tile): the
  forward and dQ. Whole sequences (tiles are sliced in the kernel, masked at
  the end): Q of head h, K/V of its kv head (h // group) and the segment ids
  (None where absent).

  Returns:
    (specs, index map of the per-tile id bounds [B, 2, n]).
  """
  head_dim, head_dim_v = k.shape[-1], v.shape[-1]
  q_len, kv_len = q.shape[1], k.shape[1]
  kv_map = lambda h, b, i: (b, 0, common.kv_head(h, group), 0)  # noqa: E731
  ids_map = lambda h, b, i: (b, 0)  # noqa: E731
  bounds_map = lambda h, b, i: (b, 0, 0)  # noqa: E731
  return [
      pl.BlockSpec((None, q_len, None, head_dim), lambda h, b, i: (b, 0, h, 0)),
      pl.BlockSpec((None, kv_len, None, head_dim), kv_map),
      pl.BlockSpec((None, kv_len, None, head_dim_v), kv_map),
      None if q_ids is None else pl.BlockSpec((None, q_len), ids_map),
      None if kv_ids is None else pl.BlockSpec((None, kv_len), ids_map),
  ], bounds_map


def tile_bounds(p: common.Problem, q_ids, kv_ids, block_q: int, block_k: int):
  """Per-tile (min, max) ids [B, 2, n] for queries and keys, or (None, None)."""
  if not p.has_segments:
    return None, None
  return (common.segment_tile_bounds(q_ids, block_q,
                                     p.q_len_padded // block_q),
          common.segment_tile_bounds(kv_ids, block_k,
                                     p.kv_len_padded // block_k))


def bounds_specs(bounds, index_map) -> list:
  return [None if b is None else pl.BlockSpec((None, *b.shape[1:]), index_map)
          for b in bounds]


def forward(q, k, v, q_ids, kv_ids, *, p: common.Problem,
            block_sizes: BlockSizes, interpret: bool):
  """Forward pass on unpadded lengths.

  Args:
    q: [B, Lq, H, Dqk]; k: [B, Lk, Hkv, Dqk]; v: [B, Lk, Hkv, Dv] (head dims
      padded to powers of two, lengths real: p.q_len, p.kv_len).
    q_ids: int32 [B, Lq] or None; kv_ids: int32 [B, Lk] or None.
  Returns:
    out [B, Lq, H, Dv] (q.dtype), lse [B, H, Lq] float32.
  """
  batch, q_len, num_heads, head_dim = q.shape
  head_dim_v = v.shape[-1]
  block_q, block_k = block_sizes.block_q, block_sizes.block_k
  bounds = tile_bounds(p, q_ids, kv_ids, block_q, block_k)
  in_specs, bounds_map = query_tile_in_specs(q, k, v, q_ids, kv_ids, p.group)
  out_specs = [
      pl.BlockSpec((None, q_len, None, head_dim_v),
                   lambda h, b, i: (b, 0, h, 0)),
      pl.BlockSpec((None, None, q_len), lambda h, b, i: (b, h, 0)),
  ]
  out_shape = [
      jax.ShapeDtypeStruct((batch, q_len, num_heads, head_dim_v), q.dtype),
      jax.ShapeDtypeStruct((batch, num_heads, q_len), jnp.float32),
  ]
  kernel = functools.partial(_forward_kernel, p=p, block_q=block_q,
                             block_k=block_k)
  out, lse = pl.pallas_call(
      kernel,
      grid=(num_heads, batch, p.q_len_padded // block_q),
      in_specs=in_specs + bounds_specs(bounds, bounds_map),
      out_specs=out_specs,
      out_shape=out_shape,
      compiler_params=compiler_params(block_sizes, block_q, block_k,
                                      max(head_dim, head_dim_v)),
      interpret=interpret,
      name="flash_attention_fwd",
  )(q, k, v, q_ids, kv_ids, *bounds)
  return out, lse
