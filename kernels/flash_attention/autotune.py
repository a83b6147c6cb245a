"""Pick the fastest BlockSizes on the current device; write them as a table.

    best = autotune(q, k, v, is_causal=True)        # times candidates
    out = flash_attention(q, k, v, is_causal=True, block_sizes=best)

    table = autotune_table([dict(query=q, key=k, value=v, is_causal=True)],
                           path="tuned_h100.json")  # one entry per case
    out = flash_attention(q, k, v, is_causal=True,
                          block_sizes=BlockTable.load("tuned_h100.json"))

Nothing is cached in a module: the caller passes the tiles or the table, so
what a call computes never depends on which calls came before it.
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
from kernels.flash_attention.block_table import BlockTable
from kernels.flash_attention.block_table import TableKey


def default_candidates(backend: str, head_dim: int) -> list[BlockSizes]:
  """A small grid around the defaults (Triton: tiles x warps x stages)."""
  if backend == "mosaic_gpu":
    return [BlockSizes(block_q=bq, block_k=bk, block_q_dkv=64, block_k_dkv=bk,
                       block_q_dq=bq, block_k_dq=64)
            for bq, bk in itertools.product((64, 128), (64, 128))]
  if backend == "mosaic":
    return [BlockSizes(block_q=bq, block_k=bk, block_q_dkv=bq, block_k_dkv=bk,
                       block_q_dq=bq, block_k_dq=bk)
            for bq, bk in itertools.product((128, 256, 512), (128, 256, 512))]
  out = [BlockSizes.get_default("triton", head_dim)]
  fwd = [(128, 64), (128, 128), (64, 64), (64, 32)]
  # Backward tiles keep >= 64 rows (tensor cores).
  bwd = [(64, 128, 128, 64), (64, 64, 64, 64), (64, 128, 64, 64)]
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
  """Times `candidates` on the current device; returns the fastest.

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
    The fastest BlockSizes.
  Raises:
    ValueError: if no candidate runs.
  """
  platform = jax.default_backend()
  backend = backend or ("mosaic" if platform == "tpu" else "triton")
  if candidates is None:
    candidates = default_candidates(backend, query.shape[-1])

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
  return min(results, key=lambda r: r[0])[1]


def autotune_table(cases: Iterable[dict], *, table: BlockTable | None = None,
                   path: str | None = None, backend: str | None = None,
                   **kwargs) -> BlockTable:
  """Tunes every case into a `BlockTable` (and writes it to `path` as JSON).

  Args:
    cases: dicts of `autotune` arguments: query, key, value and optionally
      is_causal, segment_ids, scale.
    table: a table to extend (its entries for other keys are kept); None =
      a new one for this device kind.
    path: where to save the table (None: not saved).
    backend: as `flash_attention`; None = the platform's kernel.
    **kwargs: passed to `autotune` (candidates, reps, include_backward, ...).
  Returns:
    The table; pass it as `flash_attention(block_sizes=table)`.
  """
  backend = backend or ("mosaic" if jax.default_backend() == "tpu"
                        else "triton")
  if table is None:
    table = BlockTable(device_kind=jax.devices()[0].device_kind)
  for case in cases:
    q, k, v = case["query"], case["key"], case["value"]
    best = autotune(q, k, v, backend=backend, **case_options(case), **kwargs)
    table = table.with_entry(TableKey.of(
        backend, q.shape, k.shape, v.shape, q.dtype,
        causal=case.get("is_causal", False),
        segments=case.get("segment_ids") is not None), best)
  if path is not None:
    table.save(path)
  return table


def case_options(case: dict) -> dict:
  """The options of an `autotune_table` case besides its operands."""
  unknown = set(case) - {"query", "key", "value", "is_causal", "segment_ids",
                         "scale"}
  if unknown:
    raise ValueError(f"autotune_table: unknown case keys {sorted(unknown)}.")
  return {name: case[name] for name in ("is_causal", "segment_ids", "scale")
          if name in case}
