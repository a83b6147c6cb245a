"""Flash attention backward pass, Pallas Mosaic GPU lowering (Hopper, sm_90).

Split into two kernels, dK/dV then dQ, rather than FA3's single kernel with
dQ accumulated by float32 atomics in HBM:
  * deterministic: no atomic order, so gradients are bitwise reproducible;
  * no [B, Lq, H, D] float32 dQ buffer and no extra conversion pass;
  * each kernel owns its output tile in registers and writes it once by TMA,
    so neither needs more SMEM than the forward;
  * the price is recomputing S = Q K^T and dP = dO V^T in the dQ kernel: the
    two kernels do 7 tile matmuls (S^T, dP^T, dV, dK; S, dP, dQ) where FA3's
    single kernel does 5 (S, dP, dV, dK, dQ), i.e. 2/5 = 40 % more matmul
    work than the atomic form (tokamax's sm90 backward is split the same way).
Both kernels are warp specialised like the forward: a TMA producer
warpgroup streams tiles into a 2-deep SMEM ring (1-deep where SMEM is short,
head dim 256), waiting for each operand's own slot; two consumer warpgroups
own 64 rows each of the stationary operand (key rows for dK/dV, query rows
for dQ). P and dS stay in registers as wgmma's A operand; the stationary
accumulators (dK, dV; dQ) are wgmma accumulators for the whole loop, so a
wgmma can stay in flight while the warpgroup computes (tokamax's sm90 VJP
schedule): in dK/dV, dV = P^T dO runs while dS^T is computed from dP^T, and
dO's slot is released as soon as dV is done, Q's once dK is; in dQ, S and
dP are issued together and V's slot is released once dP is done. exp2 with
the scale folded in.
Grouped-query attention: the dK/dV kernel loops over the query heads of its
kv head, so dK/dV are summed on chip and written once, in the kv layout.
Skipped work: the same tile ranges as the forward (computed in the kernel
without segment ids, `mosaic_gpu.kv_range`/`q_range`; else from per-tile
min/max segment ids, `mosaic_gpu.tile_overlap`), read along either axis;
tiles where every pair is allowed run without a mask.
The per-row delta = rowsum(dO * O) and lse in base 2 are computed by XLA
(one fused elementwise pass). The dK/dV kernel streams them through its TMA
ring with their Q and dO tiles (as tokamax's); the dQ kernel reads its rows'
once, from HBM.
"""

from __future__ import annotations

import functools

import jax
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu
import jax.numpy as jnp

from kernels.flash_attention import common
from kernels.flash_attention import mosaic_gpu as fwd
from kernels.flash_attention.block_sizes import BlockSizes

ROW, COL = fwd.ROW, fwd.COL
WGS = fwd.COMPUTE_WGS


def _ring(step, stages):
  return lax.rem(step, jnp.int32(stages))


def _dkv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, q_ids_ref,
                kv_ids_ref, range_ref, dk_ref, dv_ref, k_smem2, v_smem2,
                q_smem, do_smem, lse_smem, delta_smem, k_ready, v_ready,
                q_ready, do_ready, q_free, do_free,
                *, p: common.Problem, bq: int, bk: int, stages: int,
                num_programs: int):
  """One CTA: 2 x bk key rows of kv head h; loops over group heads x q tiles.

  Refs: q [B, Lq, H, D], k [B, Lk, Hkv, D], v [B, Lk, Hkv, Dv], do like the
  output; lse2, delta [B, H, Lq] f32; range [B, programs, 2] (q tiles; None
  without segment ids: computed here); dk, dv like k, v.
  The ring's slot s holds (Q, lse2) under q_ready[s] and (dO, delta) under
  do_ready[s]: lse and delta come by TMA with their tile (as tokamax's sm90
  dK/dV kernel) instead of one HBM read per consumer and tile.
  """
  kv_head, batch = lax.axis_index("h"), lax.axis_index("b")
  prog = num_programs - 1 - lax.axis_index("k")
  wg = lax.axis_index("wg")
  if range_ref is None:
    lo, hi = fwd.q_range(p, prog, bq, WGS * bk)
  else:
    lo, hi = range_ref[batch, prog, 0], range_ref[batch, prog, 1]
  n = hi - lo  # q tiles per group head
  qk_scale = p.scale * common.LOG2E

  @pl.when(wg < WGS)
  def _consumer():
    plgpu.set_max_registers(232, action="increase")
    col0 = prog * (WGS * bk) + wg * bk
    k_smem, v_smem = k_smem2.at[wg], v_smem2.at[wg]
    rows = (batch, pl.ds(col0, bk), kv_head)
    plgpu.copy_gmem_to_smem(k_ref.at[rows], k_smem, k_ready.at[wg])
    plgpu.copy_gmem_to_smem(v_ref.at[rows], v_smem, v_ready.at[wg])
    kv_ids = None
    if p.has_segments:
      kv_ids = fwd.load_gmem(kv_ids_ref.at[batch, pl.ds(col0, bk)], ROW)
    plgpu.barrier_wait(k_ready.at[wg])
    plgpu.barrier_wait(v_ready.at[wg])

    def body(q_tile, carry, *, g, masked: bool, dk_acc, dv_acc):
      slot = _ring(g * n + q_tile - lo, stages)
      qs = pl.ds(q_tile * bq, bq)
      plgpu.barrier_wait(q_ready.at[slot])

      def st(acc_ref):  # S^T = K Q^T  [bk, bq]; read lse2 meanwhile
        plgpu.wgmma(acc_ref, k_smem,
                    plgpu.transpose_ref(q_smem.at[slot], (1, 0)))
        lse2 = plgpu.load(lse_smem.at[slot], (), layout=COL)
        return acc_ref[...], lse2

      s_t, lse2 = pl.run_scoped(st, plgpu.ACC((bk, bq), jnp.float32))
      if masked:
        q_ids = None
        if p.has_segments:
          q_ids = fwd.load_gmem(q_ids_ref.at[batch, qs], COL)
        mask = _mask_t(p, q_tile * bq, col0, (bk, bq), q_ids, kv_ids)
        if mask is not None:
          s_t = jnp.where(mask, s_t, -jnp.inf)
      p_t = jnp.exp2(s_t * qk_scale - lax.broadcast_in_dim(lse2, s_t.shape,
                                                           [1]))
      plgpu.barrier_wait(do_ready.at[slot])

      def dpt_dv(acc_ref):  # dP^T = V dO^T, then dV += P^T dO
        plgpu.wgmma(acc_ref, v_smem,
                    plgpu.transpose_ref(do_smem.at[slot], (1, 0)))
        plgpu.wgmma(dv_acc, p_t.astype(do_ref.dtype), do_smem.at[slot])
        delta = plgpu.load(delta_smem.at[slot], (), layout=COL)
        # dP^T only: dV's wgmma stays in flight through dS^T below (as
        # tokamax's sm90 dK/dV kernel), instead of a wait for both.
        return plgpu.wgmma_accumulator_load(acc_ref, wait_n=1), delta

      dp_t, delta = pl.run_scoped(dpt_dv, plgpu.ACC((bk, bq), jnp.float32))
      ds_t = p_t * (dp_t - lax.broadcast_in_dim(delta, dp_t.shape, [1]))
      plgpu.wgmma(dk_acc, ds_t.astype(q_ref.dtype), q_smem.at[slot])  # dK
      # lse2 and delta were read with plain (generic proxy) loads; their slots
      # are next written by TMA (async proxy): a proxy fence orders the two
      # (jax 0.11's interpreter checks it; tokamax fences its bias the same),
      # here while dV and dK run.
      plgpu.commit_smem()
      # Each slot is released as soon as its last reader is done: dO (and
      # delta) once dV has completed, while dK still runs; Q (and lse) once
      # dK has.
      plgpu.wgmma_wait(1)
      plgpu.barrier_arrive(do_free.at[slot])
      plgpu.wgmma_wait(0)
      plgpu.barrier_arrive(q_free.at[slot])
      return carry

    # Query tiles [lo, mid) touch the diagonal / padding / segments.
    mid = _masked_q_end(p, col0, lo, hi, bq, bk)

    def accumulate(dk_acc, dv_acc):  # dK, dV stay wgmma accumulators
      def per_head(g, carry):
        part = functools.partial(body, g=g, dk_acc=dk_acc, dv_acc=dv_acc)
        carry = lax.fori_loop(lo, mid, functools.partial(part, masked=True),
                              carry)
        return lax.fori_loop(mid, hi, functools.partial(part, masked=False),
                             carry)

      lax.fori_loop(0, p.group, per_head, None)
      return dk_acc[...], dv_acc[...]

    dk, dv = pl.run_scoped(
        accumulate, plgpu.ACC((bk, k_ref.shape[-1]), jnp.float32),
        plgpu.ACC((bk, v_ref.shape[-1]), jnp.float32))
    k_smem[...] = (dk * p.scale).astype(k_smem.dtype)  # K, V now unneeded
    v_smem[...] = dv.astype(v_smem.dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(k_smem, dk_ref.at[rows], commit_group=False)
    plgpu.copy_smem_to_gmem(v_smem, dv_ref.at[rows], commit_group=False)
    plgpu.commit_smem_to_gmem_group()
    plgpu.wait_smem_to_gmem(0)

  @pl.when(wg == WGS)
  def _producer():
    plgpu.set_max_registers(40, action="decrease")

    def load(step, wait: bool):
      g, q_tile = lax.div(step, n), lo + lax.rem(step, n)
      slot = _ring(step, stages)
      head = kv_head * p.group + g
      src = (batch, pl.ds(q_tile * bq, bq), head)
      vec = (batch, head, pl.ds(q_tile * bq, bq))
      # dO, then Q, each waiting for its own slot: the consumers free dO's
      # a dK wgmma before Q's (tokamax's pipeline loads dO before Q too).
      for tile, row, smem, row_smem, ready, free in (
          (do_ref, delta_ref, do_smem, delta_smem, do_ready, do_free),
          (q_ref, lse_ref, q_smem, lse_smem, q_ready, q_free)):
        if wait:
          plgpu.barrier_wait(free.at[slot])
        plgpu.copy_gmem_to_smem(tile.at[src], smem.at[slot], ready.at[slot])
        plgpu.copy_gmem_to_smem(row.at[vec], row_smem.at[slot],
                                ready.at[slot])

    total = n * p.group
    for i in range(stages):
      pl.when(i < total)(functools.partial(load, jnp.int32(i), False))

    @pl.loop(stages, jnp.maximum(total, stages))
    def _(step):
      load(step, True)


def _mask_t(p, row0, col0, shape, q_ids, kv_ids):
  """Allowed pairs of a transposed [key, query] tile (or None)."""
  rows = row0 + plgpu.broadcasted_iota(jnp.int32, shape, 1, layout=fwd.WGMMA)
  cols = col0 + plgpu.broadcasted_iota(jnp.int32, shape, 0, layout=fwd.WGMMA)
  ids = (None, None)
  if q_ids is not None:
    ids = (lax.broadcast_in_dim(q_ids, shape, [1]),
           lax.broadcast_in_dim(kv_ids, shape, [0]))
  return common.allowed(p, rows, cols, *ids)


def _masked_q_end(p, col0, lo, hi, bq, bk):
  """Query tiles [lo, end) need a mask for key rows [col0, col0 + bk)."""
  if p.has_segments:
    return hi
  end = lo
  if p.causal:  # a tile is unmasked once its first row sees col0 + bk - 1
    first = jnp.maximum(col0 + (bk - 1 - p.offset), 0)
    end = lax.div(first + (bq - 1), jnp.int32(bq))
  if p.kv_padded:
    end = jnp.where(col0 + bk > p.kv_len, hi, end)
  return jnp.clip(end, lo, hi)


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, q_ids_ref,
               kv_ids_ref, range_ref, dq_ref, q_smem2, do_smem2, k_smem, v_smem,
               q_ready, do_ready, k_ready, v_ready, k_free, v_free, *,
               p: common.Problem, bq: int, bk: int, stages: int,
               num_programs: int):
  """One CTA: 2 x bq query rows of head h; streams the key tiles [lo, hi)."""
  head, batch = lax.axis_index("h"), lax.axis_index("b")
  prog = num_programs - 1 - lax.axis_index("q")
  wg = lax.axis_index("wg")
  if range_ref is None:
    lo, hi = fwd.kv_range(p, prog, WGS * bq, bk)
  else:
    lo, hi = range_ref[batch, prog, 0], range_ref[batch, prog, 1]
  qk_scale = p.scale * common.LOG2E

  @pl.when(wg < WGS)
  def _consumer():
    plgpu.set_max_registers(232, action="increase")
    row0 = prog * (WGS * bq) + wg * bq
    q_smem, do_smem = q_smem2.at[wg], do_smem2.at[wg]
    rows = (batch, pl.ds(row0, bq), head)
    plgpu.copy_gmem_to_smem(q_ref.at[rows], q_smem, q_ready.at[wg])
    plgpu.copy_gmem_to_smem(do_ref.at[rows], do_smem, do_ready.at[wg])
    lse2 = fwd.load_gmem(lse_ref.at[batch, head, pl.ds(row0, bq)], ROW)
    delta = fwd.load_gmem(delta_ref.at[batch, head, pl.ds(row0, bq)], ROW)
    q_ids = None
    if p.has_segments:
      q_ids = fwd.load_gmem(q_ids_ref.at[batch, pl.ds(row0, bq)], ROW)
    plgpu.barrier_wait(q_ready.at[wg])
    plgpu.barrier_wait(do_ready.at[wg])

    def wait_kv(kv_tile):
      @pl.when(kv_tile < hi)
      def _():
        slot = _ring(kv_tile - lo, stages)
        plgpu.barrier_wait(k_ready.at[slot])
        plgpu.barrier_wait(v_ready.at[slot])

    wait_kv(lo)

    def body(kv_tile, carry, *, masked: bool, dq_acc):
      slot = _ring(kv_tile - lo, stages)

      def dp_s(dp_ref, s_ref):
        # dP = dO V^T and S = Q K^T issued together, one wait for both (as
        # tokamax's sm90 dQ kernel), dP first so that V is released as soon
        # as it is done, while S may still run.
        plgpu.wgmma(dp_ref, do_smem,
                    plgpu.transpose_ref(v_smem.at[slot], (1, 0)))
        plgpu.wgmma(s_ref, q_smem,
                    plgpu.transpose_ref(k_smem.at[slot], (1, 0)))
        plgpu.wgmma_wait(1)
        plgpu.barrier_arrive(v_free.at[slot])
        return dp_ref[...], s_ref[...]

      acc = plgpu.ACC((bq, bk), jnp.float32)
      dp, s = pl.run_scoped(dp_s, acc, acc)
      if masked:
        kv_ids = None
        if p.has_segments:
          kv_ids = fwd.load_gmem(
              kv_ids_ref.at[batch, pl.ds(kv_tile * bk, bk)], COL)
        mask = fwd.tile_mask(p, row0, kv_tile * bk, (bq, bk), q_ids, kv_ids)
        if mask is not None:
          s = jnp.where(mask, s, -jnp.inf)
      probs = jnp.exp2(s * qk_scale - lax.broadcast_in_dim(lse2, s.shape, [0]))
      ds = probs * (dp - lax.broadcast_in_dim(delta, dp.shape, [0]))
      plgpu.wgmma(dq_acc, ds.astype(k_ref.dtype), k_smem.at[slot])  # dQ += dS K
      if stages > 1:  # the next tile is in another slot: wait meanwhile
        wait_kv(kv_tile + 1)
      plgpu.wgmma_wait(0)
      plgpu.barrier_arrive(k_free.at[slot])
      if stages == 1:  # it reuses this slot: only loaded once released above
        wait_kv(kv_tile + 1)
      return carry

    def accumulate(dq_acc):  # dQ stays a wgmma accumulator across the loop
      mid = fwd.unmasked_end(p, row0, lo, hi, bk)
      part = functools.partial(body, dq_acc=dq_acc)
      lax.fori_loop(lo, mid, functools.partial(part, masked=False), None)
      lax.fori_loop(mid, hi, functools.partial(part, masked=True), None)
      return dq_acc[...]

    dq = pl.run_scoped(accumulate,
                       plgpu.ACC((bq, q_ref.shape[-1]), jnp.float32))
    q_smem[...] = (dq * p.scale).astype(q_smem.dtype)  # Q now unneeded
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(q_smem, dq_ref.at[rows])
    plgpu.wait_smem_to_gmem(0)

  @pl.when(wg == WGS)
  def _producer():
    plgpu.set_max_registers(40, action="decrease")
    kv_head = common.kv_head(head, p.group)

    def load(kv_tile, slot, wait: bool):
      # V and K wait for their own slot: V is released a dQ wgmma earlier.
      src = (batch, pl.ds(kv_tile * bk, bk), kv_head)
      for ref, smem, ready, free in ((v_ref, v_smem, v_ready, v_free),
                                     (k_ref, k_smem, k_ready, k_free)):
        if wait:
          plgpu.barrier_wait(free.at[slot])
        plgpu.copy_gmem_to_smem(ref.at[src], smem.at[slot], ready.at[slot])

    for i in range(stages):
      pl.when(lo + i < hi)(functools.partial(load, lo + i, i, False))

    @pl.loop(lo + stages, hi)
    def _(kv_tile):
      load(kv_tile, _ring(kv_tile - lo, stages), True)


def _stages(fixed_bytes: int, per_stage_bytes: int) -> int:
  """2-deep ring if it fits the SMEM budget, else 1 (head dim 256)."""
  return 2 if fixed_bytes + 2 * per_stage_bytes <= fwd.SMEM_BYTES else 1


def smem_bytes_dkv(block_q: int, block_k: int, head_dim: int, head_dim_v: int,
                   stages: int, itemsize: int = 2) -> int:
  """Shared memory of the dK/dV kernel: K/V per warpgroup, the (Q, lse2,
  dO, delta) ring."""
  dims = head_dim + head_dim_v
  return WGS * block_k * dims * itemsize + stages * (
      block_q * dims * itemsize + 2 * block_q * 4)


def smem_bytes_dq(block_q: int, block_k: int, head_dim: int, head_dim_v: int,
                  stages: int, itemsize: int = 2) -> int:
  """Shared memory of the dQ kernel: Q/dO per warpgroup, the K/V ring."""
  dims = head_dim + head_dim_v
  return (WGS * block_q + stages * block_k) * dims * itemsize


def _barriers(*names, ring=(), stages=1, arrivals=1):
  out = {n: plgpu.Barrier(num_barriers=WGS) for n in names}
  out.update({n: plgpu.Barrier(num_arrivals=arrivals, num_barriers=stages)
              for n in ring})
  return out


def backward(q, k, v, q_ids, kv_ids, out, lse, dout, *, p: common.Problem,
             block_sizes: BlockSizes, interpret: bool):
  """Padded backward pass (bf16/fp16): the dK/dV kernel, then dQ.

  Args:
    q, k, v, q_ids, kv_ids: as `mosaic_gpu.forward`.
    out: [B, Lq_pad, H, Dv]; lse: [B, H, Lq_pad] f32 (+inf on padded rows);
    dout: [B, Lq_pad, H, Dv] in q.dtype.
    interpret: unused (see `mosaic_gpu.forward`).
  Returns:
    dq, dk, dv shaped and typed like q, k, v.
  """
  del interpret
  batch, q_len, num_heads, head_dim = q.shape
  kv_len, num_kv_heads, head_dim_v = k.shape[1], k.shape[2], v.shape[-1]
  itemsize = jnp.dtype(q.dtype).itemsize
  delta = jnp.einsum("bqhd,bqhd->bhq", out.astype(jnp.float32),
                     dout.astype(jnp.float32))
  lse2 = lse * common.LOG2E  # base 2: p = exp2(s * scale * log2 e - lse2)
  tq, tv = fwd.smem_transforms(q.dtype), fwd.smem_transforms(v.dtype)
  params = dict(num_threads=WGS + 1, thread_name="wg",
                compiler_params=fwd.compiler_params())
  operands = (q, k, v, dout, lse2, delta, q_ids, kv_ids)

  def ranges_of(overlap):  # None: the kernels compute them (fwd.kv_range)
    return fwd.tile_ranges(overlap()) if p.has_segments else None

  # dK/dV: CTAs over key rows, streaming (q, lse2, dO, delta) tiles.
  bq, pair = block_sizes.dkv
  bk = pair // WGS
  size = functools.partial(smem_bytes_dkv, bq, bk, head_dim, head_dim_v,
                           itemsize=itemsize)
  stages = _stages(size(0), size(1) - size(0))
  ranges = ranges_of(lambda: jnp.swapaxes(fwd.tile_overlap(
      p, q_ids, kv_ids, batch=batch, block_q=bq, block_k=pair), 1, 2))
  num_programs = kv_len // pair
  dk, dv = plgpu.kernel(
      functools.partial(_dkv_kernel, p=p, bq=bq, bk=bk, stages=stages,
                        num_programs=num_programs),
      out_type=(jax.ShapeDtypeStruct(k.shape, k.dtype),
                jax.ShapeDtypeStruct(v.shape, v.dtype)),
      scratch_types=dict(
          k_smem2=plgpu.SMEM((WGS, bk, head_dim), k.dtype, transforms=tq),
          v_smem2=plgpu.SMEM((WGS, bk, head_dim_v), v.dtype, transforms=tv),
          q_smem=plgpu.SMEM((stages, bq, head_dim), q.dtype, transforms=tq),
          do_smem=plgpu.SMEM((stages, bq, head_dim_v), q.dtype,
                             transforms=tv),
          lse_smem=plgpu.SMEM((stages, bq), jnp.float32),
          delta_smem=plgpu.SMEM((stages, bq), jnp.float32),
          **_barriers("k_ready", "v_ready"),
          # Two TMA copies complete each: (Q, lse2) and (dO, delta).
          **_barriers(ring=("q_ready", "do_ready"), stages=stages,
                      arrivals=2),
          **_barriers(ring=("q_free", "do_free"), stages=stages,
                      arrivals=WGS)),
      grid=(num_kv_heads, batch, num_programs), grid_names=("h", "b", "k"),
      kernel_name="flash_attention_dkv_mgpu", **params,
  )(*operands, ranges)

  # dQ: CTAs over query rows, streaming (K, V) tiles.
  pair, bk = block_sizes.dq
  bq = pair // WGS
  size = functools.partial(smem_bytes_dq, bq, bk, head_dim, head_dim_v,
                           itemsize=itemsize)
  stages = _stages(size(0), size(1) - size(0))
  ranges = ranges_of(lambda: fwd.tile_overlap(
      p, q_ids, kv_ids, batch=batch, block_q=pair, block_k=bk))
  num_programs = q_len // pair
  dq = plgpu.kernel(
      functools.partial(_dq_kernel, p=p, bq=bq, bk=bk, stages=stages,
                        num_programs=num_programs),
      out_type=jax.ShapeDtypeStruct(q.shape, q.dtype),
      scratch_types=dict(
          q_smem2=plgpu.SMEM((WGS, bq, head_dim), q.dtype, transforms=tq),
          do_smem2=plgpu.SMEM((WGS, bq, head_dim_v), q.dtype, transforms=tv),
          k_smem=plgpu.SMEM((stages, bk, head_dim), k.dtype, transforms=tq),
          v_smem=plgpu.SMEM((stages, bk, head_dim_v), v.dtype, transforms=tv),
          **_barriers("q_ready", "do_ready"),
          **_barriers(ring=("k_ready", "v_ready"), stages=stages),
          **_barriers(ring=("k_free", "v_free"), stages=stages, arrivals=WGS)),
      grid=(num_heads, batch, num_programs), grid_names=("h", "b", "q"),
      kernel_name="flash_attention_dq_mgpu", **params,
  )(*operands, ranges)
  return dq, dk, dv
