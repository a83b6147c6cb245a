"""Flash attention forward pass, Pallas Mosaic GPU lowering (Hopper, sm_90).

FlashAttention-3 design, after JAX's `attention_mgpu.py` and tokamax's sm90
kernel. One CTA per (kv head's query head h, batch b, query program i) owns
`2 * block_q` query rows and runs three warpgroups:
  * warpgroup 2 is the TMA producer: it streams K and V tiles of the program's
    key range into a `num_stages`-deep SMEM ring (one barrier per slot and
    operand, "consumed" barriers back from the consumers);
  * warpgroups 0 and 1 each own `block_q` rows (wgmma's M = 64 per
    warpgroup). They take turns on the tensor cores through a schedule
    barrier (ping-pong): while one runs its S = Q K^T / O += P V wgmmas, the
    other does the softmax of its tile, so the exp2 work hides behind the other
    warpgroup's matmuls. P stays in registers (wgmma's A operand), O
    accumulates in place (`pl.run_state` on the accumulator).
Numerics: the softmax runs in base 2 with the scale folded in (one FMA,
`exp2(s * scale * log2 e - m)`), f32 accumulation, running max initialised to
a finite MASK_VALUE so a row with no allowed key stays NaN-free; it writes
zeros and an lse of +inf (natural log, as the other backends).
Skipped work: each program visits only the key tiles `[lo, hi)` that hold
an allowed pair. Without segment ids the range follows from the program
index, the causal diagonal and the real lengths, computed in the kernel
(`kv_range`, as JAX's and tokamax's kernels do: no XLA pre-pass, no HBM
read); with segment ids `tile_ranges` computes it once per call, in XLA,
from per-tile min/max ids (as splash attention's mask info). Tiles inside
the range whose every pair is allowed (left of the causal diagonal, no padded
key, no segment ids) run without any mask.
Causal programs are launched heaviest first (the query-tile grid axis is the
slowest and reversed), so the long rows do not form the tail of the launch.
Non-causal calls run on a persistent grid (one CTA per SM looping over the
(head, batch, query program) items, as tokamax's sm90 heuristic), the K/V
ring running on from one item to the next.
Operands are padded by api.py: lengths to the tiles, head dims to a multiple
of 64 (the 128-byte swizzle of a bf16/fp16 row).
Lowering: Warpgroup semantics (`compiler_params`), chosen explicitly for all
three kernels. It is jax 0.11's default (jax 0.10 defaults to Lane), and it
is what the peers run on jax 0.11: JAX's `attention_mgpu.py` and tokamax's
sm90 kernels pass no `lowering_semantics`, so a comparison with them on the
GPU machine (jax 0.11.2) compares kernels, not lowering paths, and it is the
path jax now develops (layout inference instead of hand-placed layouts). The
kernels lower in both modes on jax 0.10.2 and 0.11.2 (checked with the cuda
export tests); nothing in them needs Lane semantics (the explicit layouts,
`layout_cast` and `plgpu.load(layout=...)`, are accepted by both).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu
import jax.numpy as jnp

from kernels.flash_attention import common
from kernels.flash_attention.block_sizes import BlockSizes

WGMMA = plgpu.Layout.WGMMA
ROW = plgpu.Layout.WGMMA.reduce(1)  # one value per accumulator row
COL = plgpu.Layout.WGMMA.reduce(0)  # one value per accumulator column
COMPUTE_WGS = 2
HEAD_DIM_MULTIPLE = 64
SMEM_BYTES = 227 * 1024  # usable shared memory per CTA on H100/H200
NUM_STAGES = 2  # K/V ring depth unless BlockSizes.num_stages says otherwise
MAX_STAGES = 4  # tokamax autotunes its sm90 forward over 2, 3 and 4 stages


def compiler_params() -> plgpu.CompilerParams:
  """The three kernels' compiler parameters.

  * Warpgroup lowering: see the module docstring.
  * `unsafe_no_auto_barriers`, as tokamax's sm90 forward: every SMEM hand-off
    in these kernels is ordered by an explicit barrier (TMA and wgmma are
    async proxies: the consumed/ready mbarriers order them), and no thread
    ever reads an SMEM region with plain loads and then overwrites it: the
    only SMEM stores are the epilogue's O/dK/dV/dQ/lse tiles, into buffers
    read before only by wgmma (awaited) and followed by `commit_smem` (a
    fence and a warpgroup barrier) before their TMA store. So the
    warpgroup-wide barriers Pallas would put around each SMEM store and
    before each TMA issue order nothing.
  """
  return plgpu.CompilerParams(
      approx_math=True, unsafe_no_auto_barriers=True,
      lowering_semantics=plgpu.LoweringSemantics.Warpgroup)


def smem_transforms(dtype):
  """Tiling + 128-byte swizzle of a [rows, head_dim] wgmma operand in SMEM."""
  swizzle_elems = 128 // jnp.dtype(dtype).itemsize
  return (plgpu.TilingTransform((8, swizzle_elems)),
          plgpu.SwizzleTransform(128))


def load_gmem(ref, layout):
  """A small 1-D HBM slice (ids, lse, delta) into registers, in `layout`.

  Not through TMA/SMEM: each is read once per tile and cached in L1/L2.
  """
  return plgpu.load(ref, (), layout=layout, optimized=False)


def tile_overlap(p: common.Problem, q_ids, kv_ids, *, batch: int, block_q: int,
                 block_k: int):
  """Which (query tile, key tile) pairs hold at least one allowed pair.

  Computed once per call from the causal diagonal, the real (unpadded) lengths
  and per-tile min/max segment ids: tiles whose id ranges do not intersect are
  fully masked.
  Returns:
    bool [B, Lq_pad // block_q, Lk_pad // block_k].
  """
  nq, nk = p.q_len_padded // block_q, p.kv_len_padded // block_k
  qi = jnp.arange(nq, dtype=jnp.int32)[:, None]
  kj = jnp.arange(nk, dtype=jnp.int32)[None, :]
  ok = jnp.logical_and(kj * block_k < p.kv_len, qi * block_q < p.q_len)
  if p.causal:  # the tile's last row sees keys <= (qi+1)*block_q - 1 + offset
    ok = jnp.logical_and(ok, kj * block_k <= (qi + 1) * block_q - 1 + p.offset)
  ok = jnp.broadcast_to(ok[None], (batch, nq, nk))
  if q_ids is None:
    return ok
  big = jnp.iinfo(jnp.int32).max

  def minmax(ids, length, tile):  # padded positions excluded
    real = jnp.arange(ids.shape[1]) < length
    lo = jnp.where(real, ids, big).reshape(batch, -1, tile).min(-1)
    hi = jnp.where(real, ids, -big).reshape(batch, -1, tile).max(-1)
    return lo, hi

  q_lo, q_hi = minmax(q_ids, p.q_len, block_q)
  k_lo, k_hi = minmax(kv_ids, p.kv_len, block_k)
  meet = jnp.logical_and(k_hi[:, None, :] >= q_lo[:, :, None],
                         k_lo[:, None, :] <= q_hi[:, :, None])
  return jnp.logical_and(ok, meet)


def tile_ranges(overlap):
  """[lo, hi) hull of the True entries along the last axis -> int32 [..., 2].

  Tiles inside the hull that hold no allowed pair (non-sorted segment ids) are
  visited with the mask applied; an empty row gives lo = hi = 0.
  """
  n = overlap.shape[-1]
  anyv = overlap.any(-1)
  lo = jnp.argmax(overlap, axis=-1).astype(jnp.int32)
  hi = (n - jnp.argmax(overlap[..., ::-1], axis=-1)).astype(jnp.int32)
  return jnp.stack([jnp.where(anyv, lo, 0), jnp.where(anyv, hi, 0)], -1)


def _cdiv(x, d: int):
  """Ceil division of a non-negative traced int32 by a positive int."""
  return lax.div(x + jnp.int32(d - 1), jnp.int32(d))


def kv_range(p: common.Problem, prog, rows: int, block_k: int):
  """Key tiles [lo, hi) of query program `prog` (`rows` rows), no segments.

  In-kernel scalar arithmetic equal to `tile_ranges(tile_overlap(...))`
  without segment ids: a key tile is visited iff it holds a real key and,
  when causal, a key at or left of the diagonal for the program's last row;
  a program of padded rows only visits nothing.
  """
  prog = jnp.asarray(prog, jnp.int32)
  hi = jnp.int32(-(-p.kv_len // block_k))  # tiles holding a real key
  if p.causal:  # the last row sees columns < (prog + 1) * rows + offset
    seen = jnp.maximum((prog + 1) * rows + p.offset, 0)
    hi = jnp.minimum(hi, _cdiv(seen, block_k))
  hi = jnp.where(prog * rows < p.q_len, hi, 0)
  # lo is a Python 0, not an array constant: Warpgroup lowering rejects
  # array constants closed over by a `run_state` body.
  return 0, hi


def q_range(p: common.Problem, prog, block_q: int, cols: int):
  """Query tiles [lo, hi) of key program `prog` (`cols` keys), no segments.

  The transpose of `kv_range` (the dK/dV kernel's loop): a query tile is
  visited iff it holds a real row and, when causal, its last row sees the
  program's first key; a program of padded keys only visits nothing.
  """
  prog = jnp.asarray(prog, jnp.int32)
  hi = jnp.int32(-(-p.q_len // block_q))
  lo = jnp.zeros_like(prog)
  if p.causal:  # tile t's last row sees key c iff (t + 1) * block_q > c - off
    first = jnp.maximum(prog * cols - p.offset + 1, 0)
    lo = jnp.maximum(_cdiv(first, block_q) - 1, 0)
  ok = jnp.logical_and(prog * cols < p.kv_len, lo < hi)
  return jnp.where(ok, lo, 0), jnp.where(ok, hi, 0)


def tile_mask(p: common.Problem, row0, col0, shape, q_ids=None, kv_ids=None):
  """Allowed pairs of one [rows, cols] tile in the WGMMA layout (or None)."""
  rows = row0 + plgpu.broadcasted_iota(jnp.int32, shape, 0, layout=WGMMA)
  cols = col0 + plgpu.broadcasted_iota(jnp.int32, shape, 1, layout=WGMMA)
  ids = None
  if q_ids is not None:
    ids = (lax.broadcast_in_dim(q_ids, shape, [0]),
           lax.broadcast_in_dim(kv_ids, shape, [1]))
  return common.allowed(p, rows, cols, *(ids or (None, None)))


def unmasked_end(p: common.Problem, row0, lo, hi, block_k: int):
  """Key tiles [lo, end) need no mask for rows >= row0 (see common)."""
  if p.has_segments:
    return lo
  full = p.kv_len // block_k
  if p.causal:
    end = lax.div(jnp.maximum(row0 + (p.offset + 1), 0), jnp.int32(block_k))
    full = jnp.minimum(end, full)
  return jnp.clip(full, lo, hi)


@dataclasses.dataclass(frozen=True)
class _Tiles:
  block_q: int  # rows per consumer warpgroup
  block_k: int
  num_stages: int


def _forward_kernel(q_ref, k_ref, v_ref, q_ids_ref, kv_ids_ref, range_ref,
                    out_ref, lse_ref, qo_smem2, o_smem2, k_smem, v_smem,
                    lse_smem2, k_ready, v_ready, q_ready, k_free, v_free,
                    schedule, *, p: common.Problem, t: _Tiles, num_programs,
                    persistent: bool):
  """Refs: q [B, Lq, H, D], k [B, Lk, Hkv, D], v [B, Lk, Hkv, Dv] (GMEM);
  ids [B, L] int32 or None; range [B, programs, 2] (None without segment
  ids: computed here); out like q with Dv; lse [B, H, Lq] f32.

  A work item is one (head, batch, query program). Non-persistent: the
  grid's CTA does one. Persistent: each CTA loops over items (`nd_loop`); the
  K/V ring and its barriers run on across items (`prev`: the key tiles the
  CTA streamed before), so the producer loads the next item's first tiles
  while the consumers finish the current one.
  """
  bq, bk, stages = t.block_q, t.block_k, t.num_stages
  wg = lax.axis_index("wg")
  dtype = q_ref.dtype
  qk_scale = p.scale * common.LOG2E  # base 2, scale folded into the exp2 FMA

  def schedule_sync():
    plgpu.barrier_arrive(schedule)
    plgpu.barrier_wait(schedule)

  @pl.when(wg < COMPUTE_WGS)
  def _():
    plgpu.set_max_registers(232, action="increase")

  @pl.when(wg == COMPUTE_WGS)
  def _():
    plgpu.set_max_registers(40, action="decrease")

  def work(head, batch, prog, prev):
    """One work item; returns `prev` plus the key tiles it streamed."""
    if range_ref is None:
      lo, hi = kv_range(p, prog, COMPUTE_WGS * bq, bk)
    else:
      lo, hi = range_ref[batch, prog, 0], range_ref[batch, prog, 1]

    def ring(kv_tile):  # (slot, how many tiles the CTA streamed before it)
      step = prev + kv_tile - lo
      return lax.rem(step, stages), step

    @pl.when(wg < COMPUTE_WGS)
    def _consumer():
      consume(head, batch, prog, lo, hi, ring)

    @pl.when(wg == COMPUTE_WGS)
    def _producer():
      produce(head, batch, lo, hi, ring)

    return prev + jnp.maximum(hi - lo, 0)

  def consume(head, batch, prog, lo, hi, ring):
    row0 = prog * (COMPUTE_WGS * bq) + wg * bq
    q_smem = qo_smem2.at[wg]
    plgpu.copy_gmem_to_smem(q_ref.at[batch, pl.ds(row0, bq), head], q_smem,
                            q_ready.at[wg])
    q_ids = None
    if p.has_segments:
      q_ids = load_gmem(q_ids_ref.at[batch, pl.ds(row0, bq)], ROW)
    plgpu.barrier_wait(q_ready.at[wg])

    @pl.when(hi > lo)
    def _():
      plgpu.barrier_wait(k_ready.at[ring(lo)[0]])

    pl.when(wg == 1)(schedule_sync)  # offset the two warpgroups by one phase

    def body(kv_tile, carry, *, masked: bool):
      acc, m_prev, l_prev = carry
      slot = ring(kv_tile)[0]

      def qk(acc_ref):
        plgpu.wgmma(acc_ref, q_smem,
                    plgpu.transpose_ref(k_smem.at[slot], (1, 0)))
        schedule_sync()  # let the other warpgroup's P V go first
        return acc_ref[...]

      s = pl.run_scoped(qk, plgpu.ACC((bq, bk), jnp.float32))
      plgpu.barrier_arrive(k_free.at[slot])
      scale = qk_scale
      if scale < 0:  # max(s) * scale is not max(s * scale)
        s, scale = s * scale, 1.0
      if masked:
        kv_ids = None
        if p.has_segments:
          kv_ids = load_gmem(
              kv_ids_ref.at[batch, pl.ds(kv_tile * bk, bk)], COL)
        mask = tile_mask(p, row0, kv_tile * bk, (bq, bk), q_ids, kv_ids)
        if mask is not None:  # -inf scores give p = 0 as m stays finite
          s = jnp.where(mask, s, -jnp.inf)
      m_next = jnp.maximum(m_prev, s.max(axis=1) * scale)
      alpha = jnp.exp2(m_prev - m_next)
      probs = jnp.exp2(s * scale - lax.broadcast_in_dim(m_next, s.shape, [0]))
      acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
      l_next = l_prev * alpha + probs.sum(axis=1)
      p16 = probs.astype(dtype)
      acc, l_next, m_next, p16 = lax.optimization_barrier(
          (acc, l_next, m_next, p16))
      plgpu.barrier_arrive(schedule)  # softmax done
      plgpu.barrier_wait(v_ready.at[slot])
      plgpu.barrier_wait(schedule)  # tensor cores free

      def pv(acc_ref):
        plgpu.wgmma(acc_ref, p16, v_smem.at[slot])
        nxt = kv_tile + 1

        @pl.when(nxt < hi)
        def _():
          plgpu.barrier_wait(k_ready.at[ring(nxt)[0]])

      acc = pl.run_state(pv)(plgpu.ACC.init(acc))
      plgpu.barrier_arrive(v_free.at[slot])
      return acc, m_next, l_next

    dv = v_ref.shape[-1]
    carry = (plgpu.layout_cast(jnp.zeros((bq, dv), jnp.float32), WGMMA),
             plgpu.layout_cast(jnp.full((bq,), common.MASK_VALUE,
                                        jnp.float32), ROW),
             plgpu.layout_cast(jnp.zeros((bq,), jnp.float32), ROW))
    mid = unmasked_end(p, row0, lo, hi, bk)
    carry = lax.fori_loop(lo, mid, functools.partial(body, masked=False),
                          carry)
    acc, m, l = lax.fori_loop(mid, hi, functools.partial(body, masked=True),
                              carry)
    pl.when(wg == 0)(schedule_sync)  # balance the offset taken above

    empty = l == 0.0  # no allowed key: zeros and lse = +inf
    l_safe = jnp.where(empty, 1.0, l)
    acc = acc * lax.broadcast_in_dim(1.0 / l_safe, acc.shape, [0])
    o_smem = qo_smem2.at[wg] if o_smem2 is None else o_smem2.at[wg]
    o_smem[...] = acc.astype(dtype)
    lse_smem2[wg] = jnp.where(empty, jnp.inf,
                              m * common.LN2 + jnp.log(l_safe))
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(o_smem, out_ref.at[batch, pl.ds(row0, bq), head],
                            commit_group=False)
    plgpu.copy_smem_to_gmem(lse_smem2.at[wg],
                            lse_ref.at[batch, head, pl.ds(row0, bq)],
                            commit_group=False)
    plgpu.commit_smem_to_gmem_group()
    plgpu.wait_smem_to_gmem(0)

  def produce(head, batch, lo, hi, ring):
    kv_head = common.kv_head(head, p.group)

    @pl.loop(lo, hi)
    def _(kv_tile):
      slot, step = ring(kv_tile)
      # K and V wait for their own slot (as JAX's attention_mgpu.py): the
      # consumers free K after Q K^T, a whole softmax before V, so the next
      # K load starts that much earlier than with one wait for both. The
      # first `stages` tiles of a CTA go into empty slots.
      rows = (batch, pl.ds(kv_tile * bk, bk), kv_head)
      for ref, smem, ready, free in ((k_ref, k_smem, k_ready, k_free),
                                     (v_ref, v_smem, v_ready, v_free)):
        @pl.when(step >= stages)
        def _():
          plgpu.barrier_wait(free.at[slot])

        plgpu.copy_gmem_to_smem(ref.at[rows], smem.at[slot], ready.at[slot])

  if persistent:  # static-scheduled items, heaviest-first is moot (no causal)
    @plgpu.nd_loop((q_ref.shape[2], q_ref.shape[0], num_programs),
                   collective_axes="sm", init_carry=jnp.int32(0))
    def _(info, carry):
      head, batch, prog = info.index
      return work(head, batch, prog, carry)
  else:
    work(lax.axis_index("h"), lax.axis_index("b"),
         num_programs - 1 - lax.axis_index("q"),  # heavy (causal) first
         0)  # a Python 0, see kv_range


def smem_bytes(block_q: int, block_k: int, head_dim: int, head_dim_v: int,
               num_stages: int = NUM_STAGES, itemsize: int = 2) -> int:
  """Shared memory of the forward kernel (Q/O, K/V ring, lse)."""
  q = COMPUTE_WGS * block_q * head_dim
  o = 0 if head_dim == head_dim_v else COMPUTE_WGS * block_q * head_dim_v
  kv = num_stages * block_k * (head_dim + head_dim_v)
  return (q + o + kv) * itemsize + COMPUTE_WGS * block_q * 4


# CTAs of the persistent forward; None: one per SM of the device traced for
# (tests set a few, so that each CTA runs several items).
PERSISTENT_CTAS: int | None = None
SMS_H100 = 132


def num_sms() -> int:
  """CTAs of the persistent grid: `PERSISTENT_CTAS`, else the SM count of
  the device being traced for (the abstract mesh's, as `api.hopper_gpu`,
  else the first cuda device), else an H100's 132."""
  if PERSISTENT_CTAS is not None:
    return PERSISTENT_CTAS
  device = jax.sharding.get_abstract_mesh().abstract_device
  cores = getattr(device, "num_cores", None)
  if cores is None:
    try:
      cores = getattr(jax.local_devices(backend="cuda")[0], "core_count",
                      None)
    except RuntimeError:  # no cuda backend (a CPU host)
      cores = None
  return int(cores or SMS_H100)


def num_stages(block_sizes: BlockSizes, head_dim: int, head_dim_v: int,
               dtype) -> int:
  """Depth of the forward's K/V ring: `block_sizes.num_stages`, else 2.

  Two stages by default, as JAX's attention_mgpu.py, FA3's sm90 forward and
  tokamax's heuristic config; deeper rings (tokamax autotunes 2-4) are
  allowed where the shared memory holds them.
  Raises:
    ValueError: an explicit depth outside [1, MAX_STAGES], or one whose ring
      does not fit `SMEM_BYTES` with these tiles.
  """
  stages = block_sizes.num_stages or NUM_STAGES
  if not 1 <= stages <= MAX_STAGES:
    raise ValueError(f"BlockSizes.num_stages = {stages} must be in [1,"
                     f" {MAX_STAGES}] for the 'mosaic_gpu' backend.")
  need = smem_bytes(block_sizes.block_q // COMPUTE_WGS, block_sizes.block_k,
                    head_dim, head_dim_v, stages,
                    itemsize=jnp.dtype(dtype).itemsize)
  if need > SMEM_BYTES:
    raise ValueError(
        f"BlockSizes.num_stages = {stages} with block_q ="
        f" {block_sizes.block_q}, block_k = {block_sizes.block_k} and head"
        f" dims {head_dim}/{head_dim_v} needs {need} bytes of shared memory,"
        f" more than the {SMEM_BYTES} of a Hopper CTA: use fewer stages or"
        " smaller tiles.")
  return stages


def forward(q, k, v, q_ids, kv_ids, *, p: common.Problem,
            block_sizes: BlockSizes, interpret: bool):
  """Padded forward pass (bf16/fp16).

  Args:
    q: [B, Lq_pad, H, Dqk]; k: [B, Lk_pad, Hkv, Dqk]; v: [B, Lk_pad, Hkv, Dv];
      Lq_pad a multiple of block_sizes.block_q (two warpgroups' rows), head
      dims multiples of 64.
    q_ids: int32 [B, Lq_pad] or None; kv_ids: int32 [B, Lk_pad] or None.
    interpret: unused; interpret mode is selected by the caller's
      `force_gpu_interpret_mode` context (Mosaic GPU's own interpreter).
  Returns:
    out [B, Lq_pad, H, Dv] (q.dtype), lse [B, H, Lq_pad] float32.
  """
  del interpret
  batch, q_len, num_heads, head_dim = q.shape
  head_dim_v = v.shape[-1]
  rows, bk = block_sizes.block_q, block_sizes.block_k
  t = _Tiles(block_q=rows // COMPUTE_WGS, block_k=bk,
             num_stages=min(num_stages(block_sizes, head_dim, head_dim_v,
                                       q.dtype),
                            p.kv_len_padded // bk))
  num_programs = q_len // rows
  ranges = None  # without segment ids the kernel computes them (kv_range)
  if p.has_segments:
    ranges = tile_ranges(tile_overlap(p, q_ids, kv_ids, batch=batch,
                                      block_q=rows, block_k=bk))
  tq, tv = smem_transforms(q.dtype), smem_transforms(v.dtype)
  scratch = dict(
      qo_smem2=plgpu.SMEM((COMPUTE_WGS, t.block_q, head_dim), q.dtype,
                          transforms=tq),
      o_smem2=(None if head_dim == head_dim_v else plgpu.SMEM(
          (COMPUTE_WGS, t.block_q, head_dim_v), q.dtype, transforms=tv)),
      k_smem=plgpu.SMEM((t.num_stages, bk, head_dim), k.dtype, transforms=tq),
      v_smem=plgpu.SMEM((t.num_stages, bk, head_dim_v), v.dtype,
                        transforms=tv),
      lse_smem2=plgpu.SMEM((COMPUTE_WGS, t.block_q), jnp.float32),
      k_ready=plgpu.Barrier(num_barriers=t.num_stages),
      v_ready=plgpu.Barrier(num_barriers=t.num_stages),
      q_ready=plgpu.Barrier(num_barriers=COMPUTE_WGS),
      k_free=plgpu.Barrier(num_arrivals=COMPUTE_WGS,
                           num_barriers=t.num_stages),
      v_free=plgpu.Barrier(num_arrivals=COMPUTE_WGS,
                           num_barriers=t.num_stages),
      schedule=plgpu.Barrier(num_arrivals=COMPUTE_WGS),
  )
  # A persistent grid for non-causal attention, as tokamax's sm90 forward
  # heuristic (`persistent=not is_causal`): one CTA per SM loops over the
  # (head, batch, query program) items, so a CTA's K/V ring streams the next
  # item's tiles while its consumers finish the current one, and the launch
  # has no partial last wave. Causal items differ in length: there the
  # hardware scheduler's heaviest-first launch order balances better.
  persistent = not p.causal
  items = num_heads * batch * num_programs
  if persistent:
    grid, grid_names = (min(num_sms(), items),), ("sm",)
  else:
    grid, grid_names = (num_heads, batch, num_programs), ("h", "b", "q")
  kernel = functools.partial(_forward_kernel, p=p, t=t,
                             num_programs=num_programs, persistent=persistent)
  out, lse = plgpu.kernel(
      kernel,
      out_type=(jax.ShapeDtypeStruct((batch, q_len, num_heads, head_dim_v),
                                     q.dtype),
                jax.ShapeDtypeStruct((batch, num_heads, q_len), jnp.float32)),
      scratch_types=scratch,
      grid=grid,
      grid_names=grid_names,
      num_threads=COMPUTE_WGS + 1,
      thread_name="wg",
      compiler_params=compiler_params(),
      kernel_name="flash_attention_fwd_mgpu",
  )(q, k, v, q_ids, kv_ids, ranges)
  return out, lse
