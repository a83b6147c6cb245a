"""Flash attention backward pass, Pallas Mosaic GPU lowering (Hopper, sm_90).

Split into two kernels, dK/dV then dQ, rather than FA3's single kernel with
dQ accumulated by float32 atomics in HBM:
  * deterministic: no atomic order, so gradients are bitwise reproducible;
  * no [B, Lq, H, D] float32 dQ buffer and no extra conversion pass;
  * each kernel owns its output tile in registers and writes it once by TMA,
    so neither needs more SMEM than the forward;
  * the price is recomputing S = Q K^T and dP = dO V^T once more (the dQ
    kernel), about 2/7 more matmul work than the atomic form.
Both kernels are warp specialised like the forward: a TMA producer
warpgroup streams tiles into a 2-deep SMEM ring, two consumer warpgroups own
64 rows each of the stationary operand (key rows for dK/dV, query rows for
dQ), P and dS stay in registers as wgmma's A operand, accumulators are
updated in place (`pl.run_state`), exp2 with the scale folded in.
Grouped-query attention: the dK/dV kernel loops over the query heads of its
kv head, so dK/dV are summed on chip and written once, in the kv layout.
Skipped work: the same tile ranges as the forward (`mosaic_gpu.tile_overlap`:
causal diagonal, real lengths, per-tile min/max segment ids), read along
either axis; tiles where every pair is allowed run without a mask.
The per-row delta = rowsum(dO * O) and lse in base 2 are computed by XLA
(one fused elementwise pass) and read by the consumers straight from HBM.
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
                q_smem, do_smem, k_ready, v_ready, q_ready, do_ready, q_free,
                do_free,
                *, p: common.Problem, bq: int, bk: int, stages: int,
                num_programs: int):
  """One CTA: 2 x bk key rows of kv head h; loops over group heads x q tiles.

  Refs: q [B, Lq, H, D], k [B, Lk, Hkv, D], v [B, Lk, Hkv, Dv], do like the
  output; lse2, delta [B, H, Lq] f32; range [B, programs, 2] (q tiles);
  dk, dv like k, v.
  """
  kv_head, batch = lax.axis_index("h"), lax.axis_index("b")
  prog = num_programs - 1 - lax.axis_index("k")
  wg = lax.axis_index("wg")
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

    def body(q_tile, carry, *, g, masked: bool):
      dk, dv = carry
      head = kv_head * p.group + g
      slot = _ring(g * n + q_tile - lo, stages)
      qs = pl.ds(q_tile * bq, bq)
      plgpu.barrier_wait(q_ready.at[slot])

      def st(acc_ref):  # S^T = K Q^T  [bk, bq]
        plgpu.wgmma(acc_ref, k_smem,
                    plgpu.transpose_ref(q_smem.at[slot], (1, 0)))
        return acc_ref[...]

      s_t = pl.run_scoped(st, plgpu.ACC((bk, bq), jnp.float32))
      if masked:
        q_ids = None
        if p.has_segments:
          q_ids = fwd.load_gmem(q_ids_ref.at[batch, qs], COL)
        mask = _mask_t(p, q_tile * bq, col0, (bk, bq), q_ids, kv_ids)
        if mask is not None:
          s_t = jnp.where(mask, s_t, -jnp.inf)
      lse2 = fwd.load_gmem(lse_ref.at[batch, head, qs], COL)
      p_t = jnp.exp2(s_t * qk_scale - lax.broadcast_in_dim(lse2, s_t.shape,
                                                           [1]))
      plgpu.barrier_wait(do_ready.at[slot])

      def dv_dpt(refs):  # dV += P^T dO ; dP^T = V dO^T
        dv_ref, dpt_ref = refs
        plgpu.wgmma(dv_ref, p_t.astype(do_ref.dtype), do_smem.at[slot])
        plgpu.wgmma(dpt_ref, v_smem,
                    plgpu.transpose_ref(do_smem.at[slot], (1, 0)))

      zeros = plgpu.layout_cast(jnp.zeros((bk, bq), jnp.float32), fwd.WGMMA)
      dv, dp_t = pl.run_state(dv_dpt)((plgpu.ACC.init(dv),
                                        plgpu.ACC.init(zeros)))
      plgpu.barrier_arrive(do_free.at[slot])
      delta = fwd.load_gmem(delta_ref.at[batch, head, qs], COL)
      ds_t = p_t * (dp_t - lax.broadcast_in_dim(delta, dp_t.shape, [1]))

      def dk_step(acc_ref):  # dK += dS^T Q
        plgpu.wgmma(acc_ref, ds_t.astype(q_ref.dtype), q_smem.at[slot])

      dk = pl.run_state(dk_step)(plgpu.ACC.init(dk))
      plgpu.barrier_arrive(q_free.at[slot])
      return dk, dv

    # Query tiles [lo, mid) touch the diagonal / padding / segments.
    mid = _masked_q_end(p, col0, lo, hi, bq, bk)

    def per_head(g, carry):
      carry = lax.fori_loop(lo, mid, functools.partial(body, g=g, masked=True),
                            carry)
      return lax.fori_loop(mid, hi, functools.partial(body, g=g, masked=False),
                           carry)

    zero = lambda d: plgpu.layout_cast(jnp.zeros((bk, d), jnp.float32),  # noqa
                                       fwd.WGMMA)
    dk, dv = lax.fori_loop(0, p.group, per_head,
                           (zero(k_ref.shape[-1]), zero(v_ref.shape[-1])))
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

    def load(step):
      g, q_tile = lax.div(step, n), lo + lax.rem(step, n)
      slot = _ring(step, stages)
      src = (batch, pl.ds(q_tile * bq, bq), kv_head * p.group + g)
      plgpu.copy_gmem_to_smem(q_ref.at[src], q_smem.at[slot], q_ready.at[slot])
      plgpu.copy_gmem_to_smem(do_ref.at[src], do_smem.at[slot],
                              do_ready.at[slot])

    total = n * p.group
    for i in range(stages):
      pl.when(i < total)(functools.partial(load, jnp.int32(i)))

    @pl.loop(stages, jnp.maximum(total, stages))
    def _(step):
      slot = _ring(step, stages)
      plgpu.barrier_wait(q_free.at[slot])
      plgpu.barrier_wait(do_free.at[slot])
      load(step)


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

    @pl.when(hi > lo)
    def _():
      plgpu.barrier_wait(k_ready.at[0])

    def body(kv_tile, dq, *, masked: bool):
      slot = _ring(kv_tile - lo, stages)

      def qk(acc_ref):  # S = Q K^T
        plgpu.wgmma(acc_ref, q_smem,
                    plgpu.transpose_ref(k_smem.at[slot], (1, 0)))
        return acc_ref[...]

      s = pl.run_scoped(qk, plgpu.ACC((bq, bk), jnp.float32))
      if masked:
        kv_ids = None
        if p.has_segments:
          kv_ids = fwd.load_gmem(
              kv_ids_ref.at[batch, pl.ds(kv_tile * bk, bk)], COL)
        mask = fwd.tile_mask(p, row0, kv_tile * bk, (bq, bk), q_ids, kv_ids)
        if mask is not None:
          s = jnp.where(mask, s, -jnp.inf)
      probs = jnp.exp2(s * qk_scale - lax.broadcast_in_dim(lse2, s.shape, [0]))
      plgpu.barrier_wait(v_ready.at[slot])

      def dov(acc_ref):  # dP = dO V^T
        plgpu.wgmma(acc_ref, do_smem,
                    plgpu.transpose_ref(v_smem.at[slot], (1, 0)))
        return acc_ref[...]

      dp = pl.run_scoped(dov, plgpu.ACC((bq, bk), jnp.float32))
      plgpu.barrier_arrive(v_free.at[slot])
      ds = probs * (dp - lax.broadcast_in_dim(delta, dp.shape, [0]))

      def wait_next_k():
        @pl.when(kv_tile + 1 < hi)
        def _():
          plgpu.barrier_wait(k_ready.at[_ring(kv_tile + 1 - lo, stages)])

      def dq_step(acc_ref):  # dQ += dS K
        plgpu.wgmma(acc_ref, ds.astype(k_ref.dtype), k_smem.at[slot])
        if stages > 1:  # the next K tile is in another slot: wait meanwhile
          wait_next_k()

      dq = pl.run_state(dq_step)(plgpu.ACC.init(dq))
      plgpu.barrier_arrive(k_free.at[slot])
      if stages == 1:  # it reuses this slot: only loaded once released above
        wait_next_k()
      return dq

    mid = fwd.unmasked_end(p, row0, lo, hi, bk)
    dq = plgpu.layout_cast(jnp.zeros((bq, q_ref.shape[-1]), jnp.float32),
                           fwd.WGMMA)
    dq = lax.fori_loop(lo, mid, functools.partial(body, masked=False), dq)
    dq = lax.fori_loop(mid, hi, functools.partial(body, masked=True), dq)
    q_smem[...] = (dq * p.scale).astype(q_smem.dtype)  # Q now unneeded
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(q_smem, dq_ref.at[rows])
    plgpu.wait_smem_to_gmem(0)

  @pl.when(wg == WGS)
  def _producer():
    plgpu.set_max_registers(40, action="decrease")
    kv_head = common.kv_head(head, p.group)

    def load(kv_tile, slot):
      src = (batch, pl.ds(kv_tile * bk, bk), kv_head)
      plgpu.copy_gmem_to_smem(k_ref.at[src], k_smem.at[slot], k_ready.at[slot])
      plgpu.copy_gmem_to_smem(v_ref.at[src], v_smem.at[slot], v_ready.at[slot])

    for i in range(stages):
      pl.when(lo + i < hi)(functools.partial(load, lo + i, i))

    @pl.loop(lo + stages, hi)
    def _(kv_tile):
      slot = _ring(kv_tile - lo, stages)
      plgpu.barrier_wait(k_free.at[slot])
      plgpu.barrier_wait(v_free.at[slot])
      load(kv_tile, slot)


def _stages(fixed_elems: int, per_stage_elems: int, itemsize: int) -> int:
  """2-deep ring if it fits the SMEM budget, else 1 (head dim 256)."""
  two = (fixed_elems + 2 * per_stage_elems) * itemsize
  return 2 if two <= fwd.SMEM_BYTES else 1


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
  dims = head_dim + head_dim_v
  params = dict(num_threads=WGS + 1, thread_name="wg",
                compiler_params=plgpu.CompilerParams(approx_math=True))
  operands = (q, k, v, dout, lse2, delta, q_ids, kv_ids)

  # dK/dV: CTAs over key rows, streaming (q, dO) tiles.
  bq, pair = block_sizes.dkv
  bk = pair // WGS
  stages = _stages(WGS * bk * dims, bq * dims, itemsize)
  overlap = fwd.tile_overlap(p, q_ids, kv_ids, batch=batch, block_q=bq,
                             block_k=pair)
  ranges = fwd.tile_ranges(jnp.swapaxes(overlap, 1, 2))
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
          **_barriers("k_ready", "v_ready"),
          **_barriers(ring=("q_ready", "do_ready"), stages=stages),
          **_barriers(ring=("q_free", "do_free"), stages=stages,
                      arrivals=WGS)),
      grid=(num_kv_heads, batch, num_programs), grid_names=("h", "b", "k"),
      kernel_name="flash_attention_dkv_mgpu", **params,
  )(*operands, ranges)

  # dQ: CTAs over query rows, streaming (K, V) tiles.
  pair, bk = block_sizes.dq
  bq = pair // WGS
  stages = _stages(WGS * bq * dims, bk * dims, itemsize)
  ranges = fwd.tile_ranges(fwd.tile_overlap(p, q_ids, kv_ids, batch=batch,
                                            block_q=pair, block_k=bk))
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
