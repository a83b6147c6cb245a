"""Pick the fastest BlockSizes for one attention shape on the current device.

    best = autotune(q, k, v, is_causal=True)   # times candidates, caches
    out = flash_attention(q, k, v, is_causal=True)  # now uses `best`

The winner is cached in memory (api.TUNED_BLOCK_SIZES) per (shapes, dtype,
causal, segments, backend) key; `flash_attention(block_sizes=None)` looks it up
at trace time, so tune before the first jit of the model.
"""

from __future__ import annotations

import itertools
import statistics
import time
from typing import Iterable

import jax
import jax.numpy as jnp

from kernels.flash_attention import api
from kernels.flash_attention.block_sizes import BlockSizes


def default_candidates(backend: str, head_dim: int) -> list[BlockSizes]:
  """A small grid around the defaults (Triton: tiles x warps x stages)."""
  if backend == "mosaic":
    return [BlockSizes(block_q=bq, block_k=bk, block_q_dkv=bq, block_k_dkv=bk,
                       block_q_dq=bq, block_k_dq=bk)
            for bq, bk in itertools.product((128, 256, 512), (128, 256, 512))]
  out = [BlockSizes.get_default("triton", head_dim)]
  fwd = [(128, 64), (128, 128), (64, 64), (64, 32)]
  bwd = [(32, 128, 128, 32), (32, 64, 64, 32), (64, 64, 64, 64),
         (16, 64, 64, 16)]
  for (bq, bk), (dkv_q, dkv_k, dq_q, dq_k), warps, stages in itertools.product(
      fwd, bwd, (4, 8), (2, 3)):
    if head_dim > 128 and bq * bk > 64 * 64:
      continue
    out.append(BlockSizes(block_q=bq, block_k=bk, block_q_dkv=dkv_q,
                          block_k_dkv=dkv_k, block_q_dq=dq_q, block_k_dq=dq_k,
                          num_warps=warps, num_stages=stages))
  return list(dict.fromkeys(out))


def _median_seconds(fn, args, reps: int) -> float:
  jax.block_until_ready(fn(*args))  # compile + warm up
  times = []
  for _ in range(reps):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def autotune(query: jax.Array, key: jax.Array, value: jax.Array, *,
             is_causal: bool = False, segment_ids=None,
             scale: float | None = None,
             candidates: Iterable[BlockSizes] | None = None,
             include_backward: bool = True, reps: int = 10,
             interpret: bool | None = None, backend: str | None = None,
             verbose: bool = False) -> BlockSizes:
  """Times `candidates` on the current device and caches the fastest.

  Args:
    query, key, value, is_causal, segment_ids, scale: as `flash_attention`
      (concrete arrays: they are run).
    candidates: BlockSizes to try; None = `default_candidates`. Candidates that
      fail to compile or break the backend's rules are skipped.
    include_backward: time forward + backward (value_and_grad) instead of the
      forward only.
    reps: timed repetitions per candidate (median after one warm-up call).
    interpret, backend: as `flash_attention` (interpret mode for CPU tests).
    verbose: print each candidate's time.
  Returns:
    The fastest BlockSizes (also stored in api.TUNED_BLOCK_SIZES).
  Raises:
    ValueError: if no candidate runs.
  """
  platform = jax.default_backend()
  backend = backend or ("mosaic" if platform == "tpu" else "triton")
  if candidates is None:
    candidates = default_candidates(backend, query.shape[-1])
  has_segments = segment_ids is not None

  def make(blocks):
    def loss(q, k, v):
      out = api.flash_attention(q, k, v, is_causal=is_causal,
                                segment_ids=segment_ids, scale=scale,
                                block_sizes=blocks, interpret=interpret,
                                backend=backend)
      return jnp.sum(out.astype(jnp.float32))
    if include_backward:
      return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
    return jax.jit(loss)

  results = []
  for blocks in candidates:
    try:
      seconds = _median_seconds(make(blocks), (query, key, value), reps)
    except Exception as e:  # pylint: disable=broad-except
      if verbose:
        print(f"autotune: skip {blocks}: {type(e).__name__}: {e}"[:300])
      continue
    if verbose:
      print(f"autotune: {seconds * 1e3:9.3f} ms  {blocks}")
    results.append((seconds, blocks))
  if not results:
    raise ValueError("autotune: no candidate BlockSizes ran for query"
                     f" {query.shape}, key {key.shape}, value {value.shape}.")
  best = min(results, key=lambda r: r[0])[1]
  api.TUNED_BLOCK_SIZES[api.tuning_key(
      query, key, value, is_causal=is_causal, has_segments=has_segments,
      backend=backend)] = best
  return best
