"""Logic shared by the Triton and Mosaic kernels: masks and loop bounds.

Masking convention (bottom-right causal alignment, as jaxformer's
`dot_product_attention`): query row `r` may attend key column `c` iff
  c < kv_len                         (real, unpadded keys)
  and c <= r + (kv_len - q_len)      (if causal)
  and q_ids[r] == kv_ids[c]          (if segment ids are given).

Tiles are classified per (query tile, key tile) pair as
  * skipped   -- every pair masked (causal: above the diagonal); never visited,
  * unmasked  -- every pair allowed; the inner loop skips the `where`s,
  * masked    -- the rest (diagonal tiles, the padded key tile, segments).
The functions below return these ranges as (possibly traced) int32 scalars, so
the kernels' `fori_loop`s only visit the tiles that matter: causal attention
does about half the work of non-causal attention.
"""

from __future__ import annotations

import dataclasses
import math

import jax
from jax import lax
import jax.numpy as jnp

# Finite "minus infinity" for masked logits: exp of (MASK_VALUE - m) is 0 and
# MASK_VALUE - MASK_VALUE is 0, never NaN.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)
LOG2E = math.log2(math.e)
LN2 = math.log(2.0)


@dataclasses.dataclass(frozen=True)
class Problem:
  """Static description of one (padded) attention call, shared by all kernels.

  Attributes:
    q_len, kv_len: real sequence lengths.
    q_len_padded, kv_len_padded: lengths after padding to the tiles.
    causal: bottom-right aligned causal masking.
    scale: logits multiplier (1/sqrt(head_dim) by default).
    has_segments: whether segment ids are passed to the kernels.
    group: query heads per key/value head (grouped-query attention).
    precision: of the kernels' matmuls (lax.Precision); HIGHEST keeps float32
      inputs in IEEE float32 instead of TF32 on GPUs.
  """

  q_len: int
  kv_len: int
  q_len_padded: int
  kv_len_padded: int
  causal: bool
  scale: float
  has_segments: bool
  group: int = 1
  precision: lax.Precision = lax.Precision.DEFAULT

  @property
  def offset(self) -> int:
    """Causal diagonal offset: row r sees columns <= r + offset."""
    return self.kv_len - self.q_len

  @property
  def kv_padded(self) -> bool:
    return self.kv_len_padded != self.kv_len

  @property
  def q_padded(self) -> bool:
    return self.q_len_padded != self.q_len


def _i32(x):
  return jnp.asarray(x, jnp.int32)


def _div(x, d: int):
  """Floor division of a non-negative (traced) int32 by a positive int."""
  return lax.div(_i32(x), jnp.int32(d))


def _cdiv(x, d: int):
  """Ceil division of a non-negative (traced) int32 by a positive int."""
  return lax.div(_i32(x) + jnp.int32(d - 1), jnp.int32(d))


def kv_tile_range(p: Problem, q_tile, block_q: int, block_k: int):
  """Key tiles visited by query tile `q_tile`.

  Returns:
    (num_unmasked, num_total): tiles [0, num_unmasked) need no mask,
    [num_unmasked, num_total) need one, tiles >= num_total are skipped.
  """
  num_k = p.kv_len_padded // block_k
  if p.causal:
    # Last row of the tile sees columns < (q_tile + 1) * block_q + offset.
    end = jnp.maximum(_i32(q_tile) * block_q + (block_q + p.offset), 0)
    hi = jnp.minimum(_cdiv(end, block_k), num_k)
  else:
    hi = _i32(num_k)
  if p.has_segments:
    return _i32(0), hi
  full = p.kv_len // block_k  # tiles without padded keys
  if p.causal:
    # First row of the tile sees columns < q_tile * block_q + offset + 1.
    first = jnp.maximum(_i32(q_tile) * block_q + (p.offset + 1), 0)
    mid = jnp.minimum(_div(first, block_k), full)
  else:
    mid = _i32(full)
  return jnp.minimum(mid, hi), hi


def q_tile_range(p: Problem, kv_tile, block_q: int, block_k: int):
  """Query tiles visited by key tile `kv_tile` (the dK/dV kernel's loop).

  Returns:
    (lo, num_masked_end): tiles [0, lo) are skipped, [lo, num_masked_end)
    need a mask, [num_masked_end, num_q) need none.
  """
  num_q = p.q_len_padded // block_q
  kv_tile = _i32(kv_tile)
  if p.causal:
    # Row r sees column c iff r >= c - offset.
    first_row = jnp.maximum(kv_tile * block_k - p.offset, 0)
    lo = jnp.minimum(_div(first_row, block_q), num_q)
    all_row = jnp.maximum(kv_tile * block_k + (block_k - 1 - p.offset), 0)
    mid = jnp.minimum(_cdiv(all_row, block_q), num_q)
  else:
    lo, mid = _i32(0), _i32(0)
  if p.has_segments:
    mid = _i32(num_q)
  elif p.kv_padded:
    has_pad = kv_tile * block_k + block_k > p.kv_len
    mid = jnp.where(has_pad, jnp.int32(num_q), mid)
  return lo, jnp.maximum(mid, lo)


def allowed(p: Problem, rows, cols, q_ids=None, kv_ids=None):
  """Boolean mask of allowed (row, col) pairs.

  Args:
    rows: int32 query positions, broadcastable against `cols` (e.g. [bq, 1]).
    cols: int32 key positions (e.g. [1, bk]).
    q_ids, kv_ids: segment ids shaped like rows / cols, or None.
  Returns:
    bool array of the broadcast shape (None if nothing is masked).
  """
  mask = None

  def conj(a, b):
    return b if a is None else jnp.logical_and(a, b)

  if p.kv_padded:
    mask = conj(mask, jnp.broadcast_to(cols < p.kv_len,
                                       jnp.broadcast_shapes(rows.shape,
                                                            cols.shape)))
  if p.causal:
    mask = conj(mask, cols <= rows + p.offset)
  if p.has_segments:
    mask = conj(mask, q_ids == kv_ids)
  return mask


def dot(a: jax.Array, b: jax.Array, *, trans_a: bool = False,
        trans_b: bool = False, precision=None) -> jax.Array:
  """2-D matmul with float32 accumulation, optionally transposing operands."""
  return lax.dot_general(
      a, b, ((((0,) if trans_a else (1,)), ((1,) if trans_b else (0,))),
             ((), ())),
      precision=precision, preferred_element_type=jnp.float32)


def segment_tile_bounds(ids_BL: jax.Array, block: int,
                        num_tiles: int) -> jax.Array:
  """Per-tile (min, max) segment id, computed once per call (in XLA).

  Two tiles can hold an allowed (query, key) pair only if their id ranges
  meet, so a kernel skips a tile pair whose ranges are disjoint (as splash
  attention's mask info does). Packed sequences have sorted ids, so almost
  every tile pair off the block diagonal is skipped.

  Args:
    ids_BL: int32 [B, L] segment ids (L <= num_tiles * block).
  Returns:
    int32 [B, 2, num_tiles]: [:, 0] the minimum, [:, 1] the maximum; the
    padding past L repeats the last id, so it never widens a range.
  """
  batch, length = ids_BL.shape
  ids = jnp.pad(ids_BL, ((0, 0), (0, num_tiles * block - length)),
                mode="edge")
  tiles = ids.reshape(batch, num_tiles, block)
  return jnp.stack([tiles.min(-1), tiles.max(-1)], axis=1)


def tiles_meet(q_bounds_ref, q_tile, kv_bounds_ref, kv_tile):
  """Whether a query tile and a key tile may share a segment (bool scalar)."""
  return jnp.logical_and(q_bounds_ref[0, q_tile] <= kv_bounds_ref[1, kv_tile],
                         kv_bounds_ref[0, kv_tile] <= q_bounds_ref[1, q_tile])


def kv_head(head, group: int):
  """Key/value head read by query `head` (index_maps): head // group.

  lax.div, not `//`: floor division of traced ints lowers through `sign`,
  which Mosaic cannot lower without a TPU attached.
  """
  return head if group == 1 else _div(head, group)
