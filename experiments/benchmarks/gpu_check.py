"""The one GPU call: on-device correctness, kernel speed and training MFU in <= 8 min.

    python -m experiments.benchmarks.gpu_check --out experiments/benchmarks/results
    python -m experiments.benchmarks.gpu_check --dry-run      # plan + time estimate, no GPU
    python -m experiments.benchmarks.gpu_check --only kernel --head-dims 128 --seq-lens 2048

This is the short command a lent GPU runs (GPU.md: one invocation of at most 8 minutes,
compile included). ``experiments.benchmarks.attention`` stays the long, optional sweep
(every peer, seq 512..16k, torch, tokamax); it is not needed for the dispatch table.

Three parts, each printed as it runs (in the order 1, 3, 2: the speed cases come last
so that ``--budget-s`` can stop between them and the call stays within 8 minutes even
where the cost model is off; skipped cases are listed with the reason):
  1. **Correctness** under real compilation: every GPU backend -- the Mosaic GPU kernel
     (``flash_attention(backend="mosaic_gpu")``), the Triton kernel
     (``backend="triton"``), cuDNN through ``jax.nn`` (via jaxformer's cuDNN path, which
     also builds masks) and XLA (``jax.nn``) -- forward and backward (one program per
     backend and shape) against the float32 XLA reference, on small shapes: causal,
     segments, GQA, d_v != d_qk, head dim 64/128/256 (``CHECKS``). A backend that cannot
     take a case says why (e.g. Mosaic GPU takes no float32) and is not run on it.
  2. **Speed** (``speed_plan``): bf16, 16k tokens per batch, hidden 2048 (heads =
     2048 / head_dim), causal and not, forward and forward+backward, ours
     (``flash_attention`` as the dispatcher runs it: Mosaic GPU on Hopper) against
     cuDNN and XLA; head dim 128 at 2k/8k/16k, 64 and 256 at 8k. Timed on the device:
     one jitted ``lax.fori_loop`` of N calls, each call's query fed by the previous
     call's output (so nothing is hoisted), one dispatch and one sync per timing,
     divided by N; N is chosen so a timing holds about ``TARGET_MS`` of work, median of
     ``REPEATS`` timings after a warm-up. Every operand is 64 MiB at these shapes,
     more than the 50 MB L2, so no rotation of input sets is needed.
  3. **Training**: GPT-2 small, bf16, batch 8 x 1024, AdamW, ``TRAIN_STEPS`` steps
     after compile and 2 warm-up steps, attention through the default
     (``implementation=None``; the dispatcher's choice is printed) and through our
     kernel (``"pallas"``); MFU = ``6 N + 12 n_layers d L`` FLOPs per token over the
     device's dense bf16 peak.

Writes to ``--out``: ``attention-dispatch-<device>.json`` (the table
``jaxformer.attention.gpu_table`` reads: per case and mode, ms of ``pallas``, ``cudnn``
and ``xla``), ``gpu-check-<device>-<date>.md`` (device, versions, date, the three tables)
and ``.json`` (every number). Prints its own elapsed time last.

On a CPU the same code runs end to end at a tiny size (``TINY``) with the kernels in
Pallas interpret mode (CI runs it: tests/experiments/test_gpu_check.py); the backends a
CPU cannot run (Mosaic GPU, cuDNN) are reported as skipped with the reason, and the
dispatch table then has no ``cudnn`` times (so it never prefers Pallas). The Mosaic GPU
kernel's interpret-mode coverage is tests/kernels/test_flash_attention_mosaic_gpu.py.

``--dry-run`` needs no GPU: it prints the planned cases, each with its estimated cost
(``estimate_seconds``: compile time per program + FLOPs / assumed throughput x the
iterations run), and last ``estimated H100 time: N s``.

Imports only jax, numpy, flax, optax and this repository (the GPU machine lacks grain
and ml_collections).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import logging
import math
import os
import platform as platform_lib
import re
import statistics
import sys
import time
from typing import Any, Callable

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from experiments.benchmarks import attention_lib
from jaxformer.attention import gpu_table

TOKENS_PER_BATCH = 16384
HIDDEN = 2048
# Speed plan: head dim -> sequence lengths (issue 18: hd128 at 2k/8k/16k, 64/256 at 8k).
SPEED_SEQS = {128: (2048, 8192, 16384), 64: (8192,), 256: (8192,)}
IMPLS = ("pallas", "cudnn", "xla")
MODES = ("fwd", "fwd+bwd")
# XLA materialises the [B, H, Lq, Lk] scores: skipped above this many float32 bytes
# (16k at 16 heads is 16 GiB per copy; fwd+bwd keeps several).
XLA_MAX_SCORE_BYTES = 8 * 2**30
TARGET_MS = 40.0   # device work per timing
REPEATS = 3
TRAIN_STEPS = 20
TRAIN_WARMUP = 2


@dataclasses.dataclass(frozen=True)
class Size:
  """The scale of a run: FULL on a GPU, TINY on a CPU (interpret mode)."""
  name: str
  tokens_per_batch: int
  hidden: int
  speed_seqs: dict
  check_len: int
  train_preset: str  # "gpt2_small" | "gpt_tiny"
  train_batch: int
  train_len: int
  train_steps: int
  target_ms: float
  min_iters: int
  scan_layers: bool  # one compiled layer body (the GPU's 12 layers); slower on a CPU
  causal: tuple = (False, True)


FULL = Size("full", TOKENS_PER_BATCH, HIDDEN, SPEED_SEQS, check_len=384,
            train_preset="gpt2_small", train_batch=8, train_len=1024,
            train_steps=TRAIN_STEPS, target_ms=TARGET_MS, min_iters=5, scan_layers=True)
# The CPU's end-to-end run (CI): every code path once, at a size interpret mode affords.
TINY = Size("tiny", 128, 64, {32: (64,)}, check_len=40, train_preset="gpt_tiny",
            train_batch=2, train_len=16, train_steps=2, target_ms=0.0, min_iters=1,
            scan_layers=False, causal=(True,))


# ------------------------------------------------------------------ the cost model --

@dataclasses.dataclass(frozen=True)
class CostModel:
  """Assumptions of the dry-run estimate (H100 SXM, jax 0.11): stated, not measured.

  Compile seconds per program are assumptions (a Pallas kernel: Python lowering + ptxas
  per kernel, three kernels for fwd+bwd; a cuDNN graph build; an XLA fusion); the run
  records each program's real ``compile_s`` so the first GPU run recalibrates them.
  Throughputs are below the measured peers (GPU.md: cuDNN 630-700 TFLOP/s forward,
  Mosaic GPU kernels 410-490 backward), so the run-time term errs long. XLA is
  memory-bound: its time is the score traffic (about 6 float32 passes over
  [B, H, Lq, Lk] forward, 3x that for fwd+bwd) at 2.5 TB/s. The training step is
  GPT-2 small, 8 x 1024 tokens, ~6.4 TFLOP at >= 100 TFLOP/s; its layers are scanned
  (``scan_layers``), so one layer body is compiled.
  Whatever the estimate, ``--budget-s`` bounds the run (``main``).
  """
  startup_s: float = 20.0          # python + jax import, backend init
  compile_s: dict = dataclasses.field(default_factory=lambda: {
      ("pallas", "fwd"): 3.0, ("pallas", "fwd+bwd"): 6.0,
      ("cudnn", "fwd"): 2.0, ("cudnn", "fwd+bwd"): 4.0,
      ("xla", "fwd"): 1.5, ("xla", "fwd+bwd"): 2.5})
  tflops: dict = dataclasses.field(default_factory=lambda: {
      ("pallas", "fwd"): 350.0, ("pallas", "fwd+bwd"): 250.0,
      ("cudnn", "fwd"): 450.0, ("cudnn", "fwd+bwd"): 350.0})
  xla_bytes_per_s: float = 2.5e12
  # One fwd+bwd program per (backend, check case), and the float32 reference.
  check_compile_s: dict = dataclasses.field(default_factory=lambda: {
      "mosaic_gpu": 6.0, "triton": 5.0, "cudnn": 4.0, "xla": 2.5, "reference": 2.5})
  train_compile_s: float = 30.0    # GPT-2 small train step (scanned layers)
  train_step_s: float = 0.06


COST = CostModel()


def attention_flops(batch, heads, seq, head_dim, causal, mode) -> float:
  return attention_lib.attention_flops(batch, heads, seq, seq, head_dim, causal, mode)


def call_seconds(impl, mode, batch, heads, seq, head_dim, causal,
                 cost: CostModel = COST) -> float:
  """The cost model's time of one call (module doc of CostModel)."""
  if impl == "xla":
    passes = 6 * (3 if mode == "fwd+bwd" else 1)
    return passes * 4.0 * batch * heads * seq * seq / cost.xla_bytes_per_s
  flops = attention_flops(batch, heads, seq, head_dim, causal, mode)
  return flops / (cost.tflops[(impl, mode)] * 1e12)


def iterations(est_call_s: float, size: Size) -> int:
  """Calls per timing: about ``size.target_ms`` of work, at least ``min_iters``."""
  if est_call_s <= 0:
    return size.min_iters
  return max(size.min_iters, min(500, math.ceil(size.target_ms / 1e3 / est_call_s)))


# ----------------------------------------------------------------------- the plan --

@dataclasses.dataclass(frozen=True)
class SpeedCase:
  impl: str
  mode: str
  batch: int
  seq: int
  heads: int
  head_dim: int
  causal: bool
  skip: str = ""  # a planned skip, with its reason


def speed_plan(size: Size, head_dims=None, seq_lens=None) -> list[SpeedCase]:
  """The speed cases (module doc, part 2); ``head_dims``/``seq_lens`` restrict them."""
  cases = []
  for head_dim, seqs in size.speed_seqs.items():
    if head_dims is not None and head_dim not in head_dims:
      continue
    if seq_lens is not None:
      seqs = tuple(seq_lens)
    heads = max(1, size.hidden // head_dim)
    for seq in seqs:
      batch = max(1, size.tokens_per_batch // seq)
      for causal in size.causal:
        for mode in MODES:
          for impl in IMPLS:
            skip = ""
            if impl == "xla" and 4 * batch * heads * seq * seq > XLA_MAX_SCORE_BYTES:
              skip = (f"XLA's float32 scores would take"
                      f" {4 * batch * heads * seq * seq / 2**30:.0f} GiB per copy"
                      f" (> {XLA_MAX_SCORE_BYTES / 2**30:.0f} GiB)")
            cases.append(SpeedCase(impl, mode, batch, seq, heads, head_dim, causal,
                                   skip))
  return cases


@dataclasses.dataclass(frozen=True)
class CheckCase:
  """A correctness case: small, every backend that can take it, fwd + bwd."""
  name: str
  q_len: int
  kv_len: int
  heads: int
  kv_heads: int
  head_dim: int
  head_dim_v: int
  causal: bool = False
  segments: int = 0
  dtype: str = "bfloat16"


def check_plan(size: Size, head_dims=None) -> list[CheckCase]:
  n = size.check_len
  full = size is FULL
  big = 256 if full else 64
  cases = [
      CheckCase("causal_gqa_hd64", n, n, 4, 2, 64, 64, causal=True),
      CheckCase("segments_hd128", n, n + (16 if full else 8), 2, 2, 128, 128,
                segments=3),
      CheckCase("causal_segments_hd128", n, n, 2, 1, 128, 128, causal=True,
                segments=2),
      CheckCase("dv_ne_dqk", n, n, 2, 2, 128 if full else 64, 64),
      CheckCase(f"causal_hd{big}", n // 2, n, 2, 2, big, big, causal=True),
      CheckCase("float32_causal_hd64", n, n, 2, 2, 64, 64, causal=True,
                dtype="float32"),
  ]
  if not full:  # the CPU: interpret mode is slow; two cases cover every option
    cases = [CheckCase("causal_gqa_segments", n, n, 4, 2, 32, 32, causal=True,
                       segments=2),
             CheckCase("dv_ne_dqk_cross", n, n + 8, 2, 2, 32, 16)]
  if head_dims is not None:
    cases = [c for c in cases if c.head_dim in head_dims]
  return cases


CHECK_BACKENDS = ("mosaic_gpu", "triton", "cudnn", "xla")


def estimate_seconds(checks, speed, size: Size, only: str | None,
                     cost: CostModel = COST) -> tuple[float, list[tuple[str, float]]]:
  """Estimated wall time of the plan, and the cost of each part (dry run)."""
  parts = [("startup", cost.startup_s)]
  if only in (None, "kernel"):
    for c in checks:
      runs = [b for b in CHECK_BACKENDS
              if c.dtype in ("bfloat16", "float16") or b in ("triton", "xla")]
      parts.append((f"check {c.name} ({', '.join(runs)})",
                    cost.check_compile_s["reference"]
                    + sum(cost.check_compile_s[b] for b in runs)))
  if only in (None, "train"):
    for impl in ("default", "pallas"):
      parts.append((f"train gpt2_small {impl}", cost.train_compile_s +
                    (size.train_steps + TRAIN_WARMUP) * cost.train_step_s))
  if only in (None, "kernel"):
    for s in speed:
      if s.skip:
        continue
      call = call_seconds(s.impl, s.mode, s.batch, s.heads, s.seq, s.head_dim,
                          s.causal, cost)
      n = iterations(call, size)
      runs = 1 + REPEATS * n  # warm-up (one iteration) + timings
      parts.append((_speed_name(s), cost.compile_s[(s.impl, s.mode)] + runs * call))
  return sum(t for _, t in parts), parts


def within_budget(s: SpeedCase, size: Size, elapsed_s: float,
                  budget_s: float) -> SpeedCase:
  """``s``, or ``s`` marked skipped when its estimated cost would end past the budget."""
  if s.skip:
    return s
  case_s = estimate_seconds([], [s], size, "kernel")[0] - COST.startup_s
  if elapsed_s + case_s <= budget_s:
    return s
  return dataclasses.replace(s, skip=f"time budget ({elapsed_s:.0f} s spent, this case"
                             f" ~{case_s:.0f} s, {budget_s:.0f} s left for the kernels)")


def _speed_name(s: SpeedCase) -> str:
  return (f"speed {s.impl:6s} {s.mode:7s} hd{s.head_dim:<3d} L{s.seq:<5d} b{s.batch:<2d}"
          f" h{s.heads:<2d} causal={int(s.causal)}")


# -------------------------------------------------------------------- the backends --

def _segment_ids(batch, length, segments, seed):
  rng = np.random.default_rng(seed)
  return jnp.asarray(np.sort(rng.integers(0, segments, (batch, length)), axis=1)
                     .astype(np.int32))


def check_fn(backend: str, case: CheckCase, q_ids, kv_ids) -> Callable | str:
  """fn(q, k, v) -> out for ``backend`` on ``case``, or why it cannot run it here."""
  from jaxformer.attention import core  # pylint: disable=g-import-not-at-top
  from kernels.flash_attention import flash_attention  # pylint: disable=g-import-not-at-top
  from kernels.flash_attention import api as fa_api  # pylint: disable=g-import-not-at-top
  on_gpu = jax.default_backend() == "gpu"
  seg = None if q_ids is None else (q_ids, kv_ids)
  if backend == "mosaic_gpu":
    if not (on_gpu and fa_api.hopper_gpu()):
      return "needs a Hopper GPU (interpret-mode coverage: tests/kernels/" \
             "test_flash_attention_mosaic_gpu.py)"
    if case.dtype not in ("bfloat16", "float16"):
      return f"takes bf16/fp16 only, not {case.dtype}"
    return lambda q, k, v: flash_attention(q, k, v, is_causal=case.causal,
                                           segment_ids=seg, backend="mosaic_gpu")
  if backend == "triton":
    return lambda q, k, v: flash_attention(q, k, v, is_causal=case.causal,
                                           segment_ids=seg, backend="triton")
  if backend == "cudnn":
    if not on_gpu:
      return "needs an NVIDIA GPU"
    if case.dtype not in ("bfloat16", "float16"):
      return f"takes bf16/fp16 only, not {case.dtype}"
    # jaxformer's cuDNN path (jax.nn's cuDNN; masks for segments and zero rows) where
    # the dispatcher's rules (core._cannot) say cuDNN takes the case: an error here is
    # a rule that lets through a call cuDNN rejects.
    reason = core._cannot(  # pylint: disable=protected-access
        "cudnn", jax.ShapeDtypeStruct((2, case.q_len, case.heads, case.head_dim),
                                      case.dtype),
        jax.ShapeDtypeStruct((2, case.kv_len, case.kv_heads, case.head_dim), case.dtype),
        jax.ShapeDtypeStruct((2, case.kv_len, case.kv_heads, case.head_dim_v),
                             case.dtype),
        q_ids, kv_ids, case.causal, has_mask=False, has_bias=False, hard=False,
        return_weights=False, dropout=False)
    if reason is not None:
      return f"the dispatcher keeps it from cuDNN: {reason}"
    return lambda q, k, v: core._cudnn_attention(  # pylint: disable=protected-access
        q, k, v, mask=None, bias=None, is_causal=case.causal, q_segment_ids=q_ids,
        kv_segment_ids=kv_ids, scale=case.head_dim ** -0.5)
  if backend == "xla":  # jaxformer's xla path: jax.nn's needs d_v == d_qk
    return lambda q, k, v: core.dot_product_attention(
        q, k, v, is_causal=case.causal, segment_ids=seg, implementation="xla")
  raise ValueError(f"unknown backend {backend!r}; known: {CHECK_BACKENDS}")


def _vjp_program(fn):
  """One jitted program: out and (dq, dk, dv) of sum(out * dout)."""
  def run(q, k, v, dout):
    out, vjp = jax.vjp(fn, q, k, v)
    return out, vjp(dout.astype(out.dtype))
  return jax.jit(run)


def _check_inputs(case: CheckCase, seed: int):
  """Float32 NumPy q, k, v, dout (standard normal) and segment ids (NumPy: no compiles)."""
  rng = np.random.default_rng(seed)
  b = 2
  shapes = ((b, case.q_len, case.heads, case.head_dim),
            (b, case.kv_len, case.kv_heads, case.head_dim),
            (b, case.kv_len, case.kv_heads, case.head_dim_v),
            (b, case.q_len, case.heads, case.head_dim_v))
  q, k, v, dout = (rng.standard_normal(s).astype(np.float32) for s in shapes)
  q_ids = kv_ids = None
  if case.segments:
    q_ids = _segment_ids(b, case.q_len, case.segments, seed + 1)
    kv_ids = (q_ids if case.kv_len == case.q_len
              else _segment_ids(b, case.kv_len, case.segments, seed + 2))
  return q, k, v, dout, q_ids, kv_ids


# Max |got - want| / max |want| per output: bf16 inputs round to 8 bits and P is rounded
# to bf16 before P @ V; float32 runs IEEE float32 products.
CHECK_TOL = {"bfloat16": 2e-2, "float16": 5e-3, "float32": 1e-4}


def run_checks(checks: list[CheckCase]) -> list[dict[str, Any]]:
  rows = []
  for i, case in enumerate(checks):
    q, k, v, dout, q_ids, kv_ids = _check_inputs(case, i)
    dtype = jnp.dtype(case.dtype)
    rounded = [x.astype(dtype) for x in (q, k, v, dout)]  # NumPy casts: no compiles
    q_c, k_c, v_c, dout_c = (jnp.asarray(x) for x in rounded)
    with jax.default_matmul_precision("highest"):
      ref_fn = check_fn("xla", case, q_ids, kv_ids)
      ref_out, ref_grads = _vjp_program(ref_fn)(
          *(jnp.asarray(x.astype(np.float32)) for x in rounded))
      ref = [np.asarray(x) for x in (ref_out, *ref_grads)]
    for backend in CHECK_BACKENDS:
      row = dict(case=case.name, backend=backend, dtype=case.dtype,
                 shape=f"q{case.q_len} kv{case.kv_len} h{case.heads}/{case.kv_heads}"
                 f" d{case.head_dim}/{case.head_dim_v}", causal=case.causal,
                 segments=case.segments, tol=CHECK_TOL[case.dtype])
      fn = check_fn(backend, case, q_ids, kv_ids)
      if isinstance(fn, str):
        row.update(status="skip", note=fn)
      else:
        try:
          t0 = time.perf_counter()
          got = _vjp_program(fn)(q_c, k_c, v_c, dout_c)
          got = [np.asarray(x, np.float32) for x in (got[0], *got[1])]
          row["seconds"] = time.perf_counter() - t0
          errs = {name: float(np.max(np.abs(g - r)) / max(np.max(np.abs(r)), 1e-6))
                  for name, g, r in zip(("out", "dq", "dk", "dv"), got, ref)}
          row["errors"] = errs
          bad = [n for n, e in errs.items() if not e <= row["tol"]]
          row.update(status="FAIL" if bad else "ok",
                     note=f"above tolerance: {bad}" if bad else "")
        except Exception as e:  # pylint: disable=broad-except
          row.update(status="ERROR", note=f"{type(e).__name__}: {str(e)[:300]}")
      print(format_check(row), flush=True)
      rows.append(row)
  return rows


def format_check(r) -> str:
  errs = r.get("errors")
  shown = (" ".join(f"{n} {e:.1e}" for n, e in errs.items()) if errs else "")
  return (f"check {r['case']:22s} {r['backend']:10s} {r['dtype']:8s} {r['status']:5s}"
          f" {shown} {r.get('note', '')}").rstrip()


# ----------------------------------------------------------------------- the timing --

def speed_fn(impl: str, causal: bool) -> Callable | str:
  """fn(q, k, v) for a speed implementation, or why it cannot run here."""
  from kernels.flash_attention import flash_attention  # pylint: disable=g-import-not-at-top
  if impl == "pallas":
    return lambda q, k, v: flash_attention(q, k, v, is_causal=causal)
  if impl == "cudnn":
    if jax.default_backend() != "gpu":
      return "needs an NVIDIA GPU"
    return lambda q, k, v: jax.nn.dot_product_attention(
        q, k, v, is_causal=causal, implementation="cudnn")
  if impl == "xla":
    return lambda q, k, v: jax.nn.dot_product_attention(
        q, k, v, is_causal=causal, implementation="xla")
  raise ValueError(f"unknown implementation {impl!r}; known: {IMPLS}")


def looped(fn, mode: str):
  """jit(f)(n, q, k, v, dout): n calls of ``fn`` (fwd) or its gradient (fwd+bwd) in one
  ``lax.fori_loop``; each call's query carries one element of the previous result, so
  the calls are sequential and none can be hoisted or removed (every output is used)."""
  def one(q, k, v, dout):
    if mode == "fwd":
      out = fn(q, k, v)
      return out[0, 0, 0, 0].astype(jnp.float32)
    loss = lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32) * dout)  # noqa
    dq, dk, dv = jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
    return (dq[0, 0, 0, 0].astype(jnp.float32) + dk[0, 0, 0, 0].astype(jnp.float32)
            + dv[0, 0, 0, 0].astype(jnp.float32))

  def run(n, q, k, v, dout):
    def body(_, carry):
      q, acc = carry
      x = one(q, k, v, dout)
      q = q.at[0, 0, 0, 0].add((x * 1e-30).astype(q.dtype))
      return q, acc + x
    return lax.fori_loop(0, n, body, (q, jnp.zeros((), jnp.float32)))[1]
  return jax.jit(run)


@functools.lru_cache(maxsize=1)
def _speed_inputs(shape, seed):
  """bf16 standard-normal q, k, v, dout on the device (cached for the next impl)."""
  key = jax.random.key(seed)
  make = jax.jit(lambda key: tuple(
      jax.random.normal(k, shape, jnp.float32).astype(jnp.bfloat16)
      for k in jax.random.split(key, 4)))
  return make(key)


def time_case(s: SpeedCase, size: Size, reps: int = REPEATS) -> dict[str, Any]:
  row = dataclasses.asdict(s)
  row["flops"] = attention_flops(s.batch, s.heads, s.seq, s.head_dim, s.causal, s.mode)
  if s.skip:
    row["note"] = s.skip
    return row
  fn = speed_fn(s.impl, s.causal)
  if isinstance(fn, str):
    row["note"] = fn
    return row
  q, k, v, dout = _speed_inputs((s.batch, s.seq, s.heads, s.head_dim),
                                s.seq + s.head_dim)
  try:
    prog = looped(fn, s.mode)
    t0 = time.perf_counter()
    jax.block_until_ready(prog(1, q, k, v, dout))  # compile + warm up
    row["compile_s"] = time.perf_counter() - t0
    est = call_seconds(s.impl, s.mode, s.batch, s.heads, s.seq, s.head_dim, s.causal)
    n = iterations(est, size)
    times = []
    for _ in range(reps):
      t0 = time.perf_counter()
      jax.block_until_ready(prog(n, q, k, v, dout))
      times.append((time.perf_counter() - t0) / n)
    row.update(iters=n, ms=1e3 * statistics.median(times),
               ms_all=[1e3 * t for t in times])
    row["tflops"] = row["flops"] / row["ms"] / 1e9
  except Exception as e:  # pylint: disable=broad-except
    row["note"] = f"{type(e).__name__}: {str(e)[:300]}"
  return row


def format_speed(r) -> str:
  ms = f"{r['ms']:9.3f} ms {r['tflops']:7.1f} TFLOP/s" if "ms" in r else " " * 28
  return f"{_speed_name(SpeedCase(**{f.name: r[f.name] for f in dataclasses.fields(SpeedCase)}))} {ms} {r.get('note', '')}".rstrip()


def dispatch_table(speed_rows, env, exclude=()) -> dict[str, Any]:
  """Rows of ``gpu_table``'s format: ms per implementation per (case, mode).

  ``exclude``: implementations left out (one that failed its correctness check must
  never win the dispatcher's choice).
  """
  times: dict[tuple, dict[str, float]] = {}
  for r in speed_rows:
    if "ms" not in r or r["impl"] in exclude:
      continue
    case = gpu_table.Case.of(r["seq"], r["seq"], jnp.bfloat16, r["causal"],
                             r["head_dim"])
    times.setdefault((case, r["mode"]), {})[r["impl"]] = r["ms"]
  cases = [dict(dataclasses.asdict(case), mode=mode, ms=ms)
           for (case, mode), ms in sorted(times.items(), key=lambda t: (
               t[0][0].head_dim, t[0][0].seq_bucket, t[0][0].causal, t[0][1]))]
  return dict(format=gpu_table.FORMAT, device_kind=env["device"], environment=env,
              source="experiments.benchmarks.gpu_check", cases=cases)


# --------------------------------------------------------------------- training --

class _Choices(logging.Handler):
  """Collects the dispatcher's log lines (which implementation it picked, and why)."""

  def __init__(self):
    super().__init__(logging.INFO)
    self.lines: list[str] = []

  def emit(self, record):
    self.lines.append(record.getMessage())


@functools.lru_cache(maxsize=1)
def _init_params(size_name: str, shape):
  from jaxformer.models import gpt  # pylint: disable=g-import-not-at-top
  size = {"full": FULL, "tiny": TINY}[size_name]
  factory = {"gpt2_small": gpt.gpt2_small, "gpt_tiny": gpt.gpt_tiny}[size.train_preset]
  model = gpt.GPT(factory(dropout_rate=0.0, attention_dropout_rate=0.0,
                          dtype=jnp.bfloat16, scan_layers=size.scan_layers))
  return jax.jit(model.init)(jax.random.key(0), jnp.zeros(shape, jnp.int32))["params"]


def train_mfu(impl: str | None, size: Size) -> dict[str, Any]:
  """Times ``size.train_steps`` AdamW steps of the preset after compile + warm-up."""
  import optax  # pylint: disable=g-import-not-at-top
  from jaxformer.models import gpt  # pylint: disable=g-import-not-at-top
  from jaxformer.training import metrics_logger  # pylint: disable=g-import-not-at-top
  factory = {"gpt2_small": gpt.gpt2_small, "gpt_tiny": gpt.gpt_tiny}[size.train_preset]
  cfg = factory(dropout_rate=0.0, attention_dropout_rate=0.0, dtype=jnp.bfloat16,
                attention_impl=impl, scan_layers=size.scan_layers)
  model = gpt.GPT(cfg)
  b, length = size.train_batch, size.train_len
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, cfg.vocab_size, (b, length + 1)).astype(np.int32)
  inputs, targets = jnp.asarray(tokens[:, :-1]), jnp.asarray(tokens[:, 1:])
  params = _init_params(size.name, inputs.shape)  # the attention path has no parameters
  tx = optax.adamw(1e-4)
  opt_state = jax.jit(tx.init)(params)

  def loss_fn(params):
    logits = model.apply({"params": params}, inputs, deterministic=True)
    return optax.softmax_cross_entropy_with_integer_labels(
        logits.astype(jnp.float32), targets).mean()

  @jax.jit
  def step(params, opt_state):
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  logger = logging.getLogger("jaxformer.attention.core")
  handler, level = _Choices(), logger.level
  logger.addHandler(handler)
  logger.setLevel(logging.INFO)
  try:
    t0 = time.perf_counter()
    params, opt_state, loss = step(params, opt_state)
    jax.block_until_ready(loss)
    compile_s = time.perf_counter() - t0
  finally:
    logger.removeHandler(handler)
    logger.setLevel(level)
  for _ in range(TRAIN_WARMUP):
    params, opt_state, loss = step(params, opt_state)
  jax.block_until_ready(loss)
  t0 = time.perf_counter()
  for _ in range(size.train_steps):
    params, opt_state, loss = step(params, opt_state)
  jax.block_until_ready(loss)
  step_s = (time.perf_counter() - t0) / size.train_steps
  num_params = sum(x.size for x in jax.tree.leaves(params))
  flops = b * length * metrics_logger.flops_per_token(
      num_params=num_params, num_layers=cfg.num_layers, width=cfg.embed_dim,
      seq_len=length)
  peak = metrics_logger.peak_flops_per_device()
  choice = sorted(set(handler.lines))
  return dict(preset=size.train_preset, attention=impl or "default",
              dispatcher=choice[:3], batch=b, length=length, steps=size.train_steps,
              compile_s=compile_s, step_ms=1e3 * step_s,
              tokens_per_s=b * length / step_s, model_tflops=flops / step_s / 1e12,
              mfu=None if peak is None else flops / step_s / peak,
              loss=float(loss))


def format_train(r) -> str:
  mfu = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
  return (f"train {r['preset']} attention={r['attention']:8s} {r['step_ms']:9.2f} ms/step"
          f" {r['tokens_per_s']:12,.0f} tok/s {r['model_tflops']:8.2f} TFLOP/s MFU {mfu}"
          f" (compile {r['compile_s']:.1f} s) {'; '.join(r['dispatcher'])}")


# ------------------------------------------------------------------------ output --

def environment() -> dict[str, Any]:
  env = attention_lib.environment()
  env["date"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
  for name in ("flax", "optax", "numpy"):
    try:
      env[name] = __import__(name).__version__
    except ImportError:
      pass
  if env["platform"] == "gpu":
    try:
      from jax._src.lib import cuda_versions  # pylint: disable=g-import-not-at-top
      if cuda_versions is not None:
        env["cudnn"] = cuda_versions.cudnn_get_version()
        env["cuda_runtime"] = cuda_versions.cuda_runtime_get_version()
    except Exception:  # pylint: disable=broad-except
      pass
    env["compute_capability"] = getattr(jax.devices()[0], "compute_capability", None)
  from kernels.flash_attention import api  # pylint: disable=g-import-not-at-top
  env["ours_kernel"] = {name: api.primary_backend(None, jnp.bfloat16, causal)
                        for name, causal in (("non-causal", False), ("causal", True))}
  return env


def markdown(env, checks, speed, train, elapsed_s) -> str:
  lines = [f"# gpu_check, {env['date'][:10]}", "",
           f"Device: {env['device']} ({env['platform']}). Versions: "
           + ", ".join(f"{k} {env[k]}" for k in ("jax", "jaxlib", "flax", "optax",
                                                   "cudnn", "cuda_runtime", "python")
                       if k in env) + f". Date: {env['date']}. Wall time {elapsed_s:.0f} s.",
           "", "Command: `python -m experiments.benchmarks.gpu_check` (module doc: method).",
           ""]
  if checks:
    lines += ["## Correctness (max |err| / max |ref| vs float32 XLA)", "",
              "| case | backend | dtype | shape | status | out | dq | dk | dv | note |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in checks:
      e = r.get("errors", {})
      lines.append(f"| {r['case']} | {r['backend']} | {r['dtype']} | {r['shape']} |"
                   f" {r['status']} | " + " | ".join(
                       f"{e[n]:.1e}" if n in e else "-" for n in ("out", "dq", "dk", "dv"))
                   + f" | {r.get('note', '')} |")
    lines.append("")
  if speed:
    lines += ["## Speed (bf16; ms per call on the device clock; FLOPs fwd 4BHL²D, halved"
              " causal, fwd+bwd 3.5x)", "",
              f"pallas = `flash_attention` as the dispatcher runs it:"
              f" {env.get('ours_kernel')}."
              + (" It FAILED a correctness check above: its times are left out of the"
                 " dispatch table." if untrusted(checks) else ""), "",
              "| head dim | seq | batch | heads | causal | mode | pallas ms | cudnn ms |"
              " xla ms | pallas TFLOP/s | cudnn TFLOP/s | pallas / cudnn speed |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    groups: dict[tuple, dict[str, dict]] = {}
    for r in speed:
      key = (r["head_dim"], r["seq"], r["batch"], r["heads"], r["causal"], r["mode"])
      groups.setdefault(key, {})[r["impl"]] = r
    for key, by in groups.items():
      ms = {i: by.get(i, {}).get("ms") for i in IMPLS}
      tf = {i: by.get(i, {}).get("tflops") for i in IMPLS}
      ratio = (f"{ms['cudnn'] / ms['pallas']:.2f}x" if ms["pallas"] and ms["cudnn"]
               else "-")
      fmt = lambda x, spec: "-" if x is None else format(x, spec)  # noqa: E731
      lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {key[3]} | {int(key[4])} |"
                   f" {key[5]} | {fmt(ms['pallas'], '.3f')} | {fmt(ms['cudnn'], '.3f')} |"
                   f" {fmt(ms['xla'], '.3f')} | {fmt(tf['pallas'], '.1f')} |"
                   f" {fmt(tf['cudnn'], '.1f')} | {ratio} |")
    notes = [f"{r['impl']} {r['mode']} hd{r['head_dim']} L{r['seq']} causal="
             f"{int(r['causal'])}: {r['note']}" for r in speed if r.get("note")]
    if notes:
      lines += ["", "Not timed:", ""] + [f"- {n}" for n in notes]
    lines.append("")
  if train:
    lines += ["## Training (AdamW, bf16)", "",
              "| preset | attention | batch x len | ms/step | tokens/s | model TFLOP/s |"
              " MFU | compile s | dispatcher |", "|---|---|---|---|---|---|---|---|---|"]
    for r in train:
      mfu = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
      lines.append(f"| {r['preset']} | {r['attention']} | {r['batch']} x {r['length']} |"
                   f" {r['step_ms']:.2f} | {r['tokens_per_s']:,.0f} |"
                   f" {r['model_tflops']:.2f} | {mfu} | {r['compile_s']:.1f} |"
                   f" {'; '.join(r['dispatcher'])} |")
    lines.append("")
  return "\n".join(lines)


def untrusted(checks) -> tuple[str, ...]:
  """Speed implementations whose kernel failed a correctness check here: "pallas" when
  the backend ``flash_attention`` runs for bf16 (``ours_kernel``) failed or errored."""
  from kernels.flash_attention import api  # pylint: disable=g-import-not-at-top
  ours = {api.primary_backend(None, jnp.bfloat16, c) for c in (False, True)}
  bad = {r["backend"] for r in checks if r["status"] in ("FAIL", "ERROR")}
  return ("pallas",) if ours & bad else ()


def write(out_dir, env, checks, speed, train, elapsed_s) -> list[str]:
  os.makedirs(out_dir, exist_ok=True)
  slug = re.sub(r"[^a-z0-9]+", "-", env["device"].lower()).strip("-")
  stem = os.path.join(out_dir, f"gpu-check-{slug}-{env['date'][:10]}")
  paths = []
  if speed:
    path = os.path.join(out_dir, gpu_table.table_filename(env["device"]))
    with open(path, "w", encoding="utf-8") as f:
      json.dump(dispatch_table(speed, env, exclude=untrusted(checks)), f, indent=1)
      f.write("\n")
    paths.append(path)
  with open(stem + ".json", "w", encoding="utf-8") as f:
    json.dump(dict(environment=env, elapsed_s=elapsed_s, checks=checks, speed=speed,
                   train=train), f, indent=1, default=str)
  with open(stem + ".md", "w", encoding="utf-8") as f:
    f.write(markdown(env, checks, speed, train, elapsed_s))
  return paths + [stem + ".json", stem + ".md"]


# -------------------------------------------------------------------------- main --

def _ints(text):
  try:
    return tuple(int(x) for x in text.split(",") if x)
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")


def main(argv=None) -> dict[str, Any]:
  start = time.perf_counter()
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", default="experiments/benchmarks/results")
  parser.add_argument("--only", choices=("kernel", "train"), default=None,
                      help="kernel = correctness + speed; train = the MFU part")
  parser.add_argument("--head-dims", type=_ints, default=None,
                      help=f"restrict the head dims (of {sorted(SPEED_SEQS)})")
  parser.add_argument("--seq-lens", type=_ints, default=None,
                      help="sequence lengths for every head dim of the speed table")
  parser.add_argument("--size", choices=("auto", "full", "tiny"), default="auto",
                      help="auto = full on a GPU, tiny elsewhere (interpret mode)")
  parser.add_argument("--budget-s", type=float, default=450.0,
                      help="wall-time bound: speed cases (timed last) that would end"
                      " past it are skipped and reported as such")
  parser.add_argument("--dry-run", action="store_true",
                      help="print the plan and its estimated H100 time; run nothing")
  args = parser.parse_args(argv)
  size = {"full": FULL, "tiny": TINY}.get(args.size)
  if args.dry_run and size is None:
    size = FULL  # the estimate is of the GPU run
  if size is None:
    size = FULL if jax.default_backend() == "gpu" else TINY
  if args.head_dims is not None:
    known = set(SPEED_SEQS) | set(size.speed_seqs)
    unknown = sorted(set(args.head_dims) - known)
    if unknown:
      parser.error(f"--head-dims: {unknown} not in {sorted(known)}")
  checks = check_plan(size, args.head_dims) if args.only in (None, "kernel") else []
  speed = (speed_plan(size, args.head_dims, args.seq_lens)
           if args.only in (None, "kernel") else [])
  if args.dry_run:
    total, parts = estimate_seconds(checks, speed, size, args.only)
    print(f"plan ({size.name} size): {len(checks)} check cases x {len(CHECK_BACKENDS)}"
          f" backends, {sum(not s.skip for s in speed)} timed speed cases"
          f" ({sum(bool(s.skip) for s in speed)} planned skips),"
          f" {0 if args.only == 'kernel' else 2} training runs")
    print(f"cost model: {COST}")
    for s in speed:
      if s.skip:
        print(f"{_speed_name(s)}  skip: {s.skip}")
    for name, seconds in parts:
      print(f"{name:64s} {seconds:7.1f} s")
    print(f"estimated H100 time: {math.ceil(total)} s")
    return dict(estimate_s=total, parts=parts)
  env = environment()
  print(json.dumps(env), flush=True)
  check_rows = run_checks(checks)
  train_rows = []  # before the speed table: the budget then bounds the one part that
  if args.only in (None, "train"):  # divides finely (speed cases), whatever train took
    for impl in (None, "pallas"):
      try:
        row = train_mfu(impl, size)
      except Exception as e:  # pylint: disable=broad-except
        print(f"train attention={impl or 'default'}: {type(e).__name__}: {str(e)[:300]}")
        continue
      print(format_train(row), flush=True)
      train_rows.append(row)
  speed_rows = []
  for s in speed:
    s = within_budget(s, size, time.perf_counter() - start, args.budget_s)
    row = time_case(s, size)
    print(format_speed(row), flush=True)
    speed_rows.append(row)
  elapsed = time.perf_counter() - start
  for path in write(args.out, env, check_rows, speed_rows, train_rows, elapsed):
    print("wrote", path)
  failed = [r for r in check_rows if r["status"] in ("FAIL", "ERROR")]
  print(f"correctness: {sum(r['status'] == 'ok' for r in check_rows)} ok,"
        f" {len(failed)} failed, {sum(r['status'] == 'skip' for r in check_rows)} skipped")
  print(f"elapsed: {elapsed:.1f} s")
  return dict(env=env, checks=check_rows, speed=speed_rows, train=train_rows,
              elapsed_s=elapsed)


if __name__ == "__main__":
  result = main()
  sys.exit(1 if any(r["status"] in ("FAIL", "ERROR")
                    for r in (result.get("checks") or [])) else 0)
