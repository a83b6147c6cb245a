"""Input checks of `flash_attention`, and `supports` (no tracing, no kernels)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

MAX_HEAD_DIM = 256
SUPPORTED_DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)


def split_segment_ids(segment_ids, q_len: int, kv_len: int):
  if segment_ids is None:
    return None, None
  if isinstance(segment_ids, (tuple, list)):
    if len(segment_ids) != 2:
      raise ValueError("segment_ids must be one [batch, length] array or a"
                       f" (q_ids, kv_ids) pair, got {len(segment_ids)} items.")
    return segment_ids[0], segment_ids[1]
  if q_len != kv_len:
    raise ValueError(
        "a single segment_ids array needs q_len == kv_len (self attention),"
        f" got q_len={q_len}, kv_len={kv_len}; pass (q_ids, kv_ids) instead.")
  return segment_ids, segment_ids


def check_inputs(query, key, value, segment_ids=None):
  """Returns (exception type, message) for unsupported inputs, else None."""
  for name, x in (("query", query), ("key", key), ("value", value)):
    if getattr(x, "ndim", None) != 4:
      return ValueError, (f"{name} must be [batch, length, heads, head_dim],"
                          f" got shape {getattr(x, 'shape', type(x))}.")
    if jnp.dtype(x.dtype) not in [jnp.dtype(d) for d in SUPPORTED_DTYPES]:
      return TypeError, (f"{name}.dtype must be bfloat16, float16 or float32,"
                         f" got {x.dtype}.")
  if not query.dtype == key.dtype == value.dtype:
    return TypeError, ("query, key and value must share a dtype, got"
                       f" {query.dtype}, {key.dtype}, {value.dtype}.")
  batch, q_len, num_heads, head_dim = query.shape
  if key.shape[0] != batch or value.shape[0] != batch:
    return ValueError, (f"batch sizes differ: query {query.shape}, key"
                        f" {key.shape}, value {value.shape}.")
  if key.shape[:3] != value.shape[:3]:
    return ValueError, ("key and value must agree on [batch, length, heads],"
                        f" got key {key.shape}, value {value.shape}.")
  if key.shape[-1] != head_dim:
    return ValueError, (f"key head_dim {key.shape[-1]} != query head_dim"
                        f" {head_dim}.")
  num_kv_heads = key.shape[2]
  if num_kv_heads == 0 or num_heads % num_kv_heads:
    return ValueError, (f"query heads ({num_heads}) must be a multiple of"
                        f" key/value heads ({num_kv_heads}).")
  for name, d in (("query/key head_dim", head_dim),
                  ("value head_dim", value.shape[-1])):
    if not 1 <= d <= MAX_HEAD_DIM:
      return ValueError, (f"{name} = {d} is not supported: the kernel keeps a"
                          f" [block, head_dim] tile on chip; valid: 1 to"
                          f" {MAX_HEAD_DIM}.")
  if q_len == 0 or key.shape[1] == 0:
    return ValueError, f"empty sequence: query {query.shape}, key {key.shape}."
  try:
    q_ids, kv_ids = split_segment_ids(segment_ids, q_len, key.shape[1])
  except ValueError as e:
    return ValueError, str(e)
  for name, ids, length in (("q segment ids", q_ids, q_len),
                            ("kv segment ids", kv_ids, key.shape[1])):
    if ids is None:
      continue
    if tuple(getattr(ids, "shape", ())) != (batch, length):
      return ValueError, (f"{name} must have shape (batch, length) ="
                          f" {(batch, length)}, got"
                          f" {getattr(ids, 'shape', type(ids))}.")
    if not jnp.issubdtype(ids.dtype, jnp.integer):
      return TypeError, f"{name} must be integers, got {ids.dtype}."
  return None


def supports(query, key, value, *, segment_ids=None,
             platform: str | None = None) -> str | None:
  """Whether the kernel handles these inputs on `platform` with compiled code.

  Args:
    query, key, value, segment_ids: as for `flash_attention` (arrays or
      jax.ShapeDtypeStruct).
    platform: "cuda", "gpu", "rocm", "tpu", "cpu"; None = jax.default_backend().
  Returns:
    None if supported, else a human-readable reason. On the CPU the kernel
    runs only in interpret mode (tests), which is reported as unsupported.
  """
  problem = check_inputs(query, key, value, segment_ids)
  if problem is not None:
    return problem[1]
  platform = (platform or jax.default_backend()).lower()
  if platform in ("gpu", "cuda", "rocm", "tpu"):
    return None
  return (f"no compiled flash attention kernel for platform {platform!r}"
          " (only cuda/rocm via Triton and tpu via Mosaic); it runs there only"
          " in interpret mode, which is for testing.")
