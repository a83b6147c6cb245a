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
import logging
import statistics
import time
from typing import Iterable

import jax
import jax.numpy as jnp

from kernels.flash_attention import api
from kernels.flash_attention import mosaic_gpu
from kernels.flash_attention.block_sizes import BlockSizes
from kernels.flash_attention.block_table import BlockTable
from kernels.flash_attention.block_table import TableKey


logger = logging.getLogger(__name__)


def default_candidates(backend: str, head_dim: int) -> list[BlockSizes]:
  """A small grid around the defaults (Triton: tiles x warps x stages).

  Every candidate keeps its backend's rules (``BlockSizes.validate``). Mosaic GPU: the
  CTA row counts (block_q, block_q_dq, block_k_dkv) stay 128, two consumer warpgroups
  of 64 rows (the 128-row rule); the streamed tiles (block_k, block_q_dkv, block_k_dq)
  take 64 or 128 (the forward's key tile also 256) where the forward's shared memory
  (``mosaic_gpu.smem_bytes``) fits.
  """
  if backend == "mosaic_gpu":
    out = []
    for bk, dkv_q, dq_k in itertools.product((64, 128, 256), (64, 128), (64, 128)):
      if mosaic_gpu.smem_bytes(64, bk, head_dim, head_dim) > mosaic_gpu.SMEM_BYTES:
        continue  # the forward's K/V ring would not fit
      out.append(BlockSizes(block_q=128, block_k=bk, block_q_dkv=dkv_q,
                            block_k_dkv=128, block_q_dq=128, block_k_dq=dq_k))
    return out
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
    candidates: BlockSizes to try; None = `default_candidates`. A candidate that
      breaks the backend's rules is an error (ValueError, before anything runs); one
      that fails to compile or run is skipped with a WARNING naming the error.
    include_backward: time forward + backward (value_and_grad) instead of the
      forward only.
    reps: timed repetitions per candidate (median after one warm-up call).
    interpret, backend: as `flash_attention` (interpret mode for CPU tests); None =
      the kernel that `flash_attention(backend=None)` runs here (Mosaic GPU on a
      Hopper GPU for bf16/fp16, so the tuned tiles are that kernel's).
    verbose: print each candidate's time.
  Returns:
    The fastest BlockSizes.
  Raises:
    ValueError: if no candidate runs.
  """
  backend = api.primary_backend(backend, query.dtype, is_causal)
  if candidates is None:
    candidates = default_candidates(backend, max(query.shape[-1], value.shape[-1]))
  candidates = list(candidates)
  platform = jax.default_backend()
  in_interpret = bool(interpret) or (interpret is None and platform not in
                                     api.NATIVE_PLATFORMS[backend])
  broken = []
  for blocks in candidates:
    try:
      blocks.fit(query.shape[1], key.shape[1], backend).validate(
          backend, interpret=in_interpret)
    except ValueError as e:
      broken.append(str(e))
  if broken:
    raise ValueError(f"autotune: {len(broken)} candidate(s) break the {backend!r}"
                     f" backend's rules: " + " | ".join(broken))

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
      logger.warning("autotune: skipped %s (%s backend): %s: %s", blocks, backend,
                     type(e).__name__, str(e)[:300])
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
    backend: as `flash_attention`; None = per case, the kernel that
      `flash_attention(backend=None)` runs here (`api.primary_backend`): Mosaic GPU
      on Hopper for bf16/fp16, so the table's keys match that branch.
    **kwargs: passed to `autotune` (candidates, reps, include_backward, ...).
  Returns:
    The table; pass it as `flash_attention(block_sizes=table)`.
  """
  if table is None:
    table = BlockTable(device_kind=jax.devices()[0].device_kind)
  for case in cases:
    q, k, v = case["query"], case["key"], case["value"]
    options = case_options(case)
    runs = api.primary_backend(backend, q.dtype, options.get("is_causal", False))
    best = autotune(q, k, v, backend=runs, **options, **kwargs)
    table = table.with_entry(TableKey.of(
        runs, q.shape, k.shape, v.shape, q.dtype,
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
