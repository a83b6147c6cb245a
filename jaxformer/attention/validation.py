"""Input checks of ``dot_product_attention``: shapes, dtypes and options, before tracing."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

IMPLEMENTATIONS = (None, "xla", "chunked", "pallas", "cudnn")


PRECISIONS = ("default", "high", "highest")


def validate(query, key, value, mask, bias, segment_ids, implementation, scale,
             dropout_rate, precision=None) -> None:
  """Raises ValueError/TypeError naming the bad argument (see dot_product_attention)."""
  fn = "dot_product_attention"
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"{fn}: implementation={implementation!r}; expected one of "
                     f"{IMPLEMENTATIONS}")
  for name, x in (("query", query), ("key", key), ("value", value)):
    if not hasattr(x, "shape") or len(x.shape) != 4:
      raise ValueError(f"{fn}: {name} must be rank 4 [batch, length, heads, head_dim]; "
                       f"got shape {getattr(x, 'shape', type(x))}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise TypeError(f"{fn}: {name} must be floating point, got dtype {x.dtype}")
  if not query.dtype == key.dtype == value.dtype:
    raise TypeError(f"{fn}: query, key and value must share a dtype; got {query.dtype}, "
                    f"{key.dtype}, {value.dtype}")
  b, q_len, h, d = query.shape
  bk, kv_len, hkv, dk = key.shape
  bv, v_len, hv, _ = value.shape
  if not b == bk == bv:
    raise ValueError(f"{fn}: batch sizes differ: query {query.shape}, key {key.shape}, "
                     f"value {value.shape}")
  if kv_len != v_len:
    raise ValueError(f"{fn}: key length {kv_len} != value length {v_len} (key "
                     f"{key.shape}, value {value.shape})")
  if hkv != hv:
    raise ValueError(f"{fn}: key heads {hkv} != value heads {hv}")
  if hkv == 0 or h % hkv:
    raise ValueError(f"{fn}: query heads {h} must be a multiple of key/value heads {hkv}")
  if d != dk:
    raise ValueError(f"{fn}: query head_dim {d} != key head_dim {dk}")
  target = (b, h, q_len, kv_len)
  for name, x, kind in (("mask", mask, "bool"), ("bias", bias, "float")):
    if x is None:
      continue
    shape = tuple(np.shape(x))
    if len(shape) > 4 or any(s not in (1, t) for s, t in zip(shape[::-1], target[::-1])):
      raise ValueError(f"{fn}: {name} of shape {shape} does not broadcast to "
                       f"[batch, heads, q_len, kv_len] = {target}")
    dtype = jnp.result_type(x)
    if kind == "bool" and dtype != jnp.bool_:
      raise TypeError(f"{fn}: mask must be bool (True = may attend), got dtype {dtype}")
    if kind == "float" and not jnp.issubdtype(dtype, jnp.floating):
      raise TypeError(f"{fn}: bias must be floating point, got dtype {dtype}")
  if segment_ids is not None:
    if isinstance(segment_ids, Sequence):
      if len(segment_ids) != 2:
        raise ValueError(f"{fn}: segment_ids must be [B, L] or a pair (q_ids, kv_ids); "
                         f"got a sequence of {len(segment_ids)}")
      pairs = (("segment_ids[0]", segment_ids[0], q_len),
               ("segment_ids[1]", segment_ids[1], kv_len))
    else:
      if q_len != kv_len:
        raise ValueError(f"{fn}: a single segment_ids array needs Lq == Lk, got Lq="
                         f"{q_len}, Lk={kv_len}; pass a pair (q_ids, kv_ids)")
      pairs = (("segment_ids", segment_ids, q_len),)
    for name, ids, length in pairs:
      shape = tuple(np.shape(ids))
      if shape != (b, length):
        raise ValueError(f"{fn}: {name} has shape {shape}; expected (batch, length) = "
                         f"{(b, length)}")
      if not jnp.issubdtype(jnp.result_type(ids), jnp.integer):
        raise TypeError(f"{fn}: {name} must be integer, got {jnp.result_type(ids)}")
  if scale is not None and not isinstance(scale, (int, float, np.floating)):
    raise TypeError(f"{fn}: scale must be a Python float or None, got {type(scale)}")
  if scale is not None and not math.isfinite(scale):
    raise ValueError(f"{fn}: scale={scale!r}; expected a finite number (or None for "
                     f"1/sqrt(head_dim))")
  if not (precision is None or isinstance(precision, jax.lax.Precision)
          or (isinstance(precision, str) and precision.lower() in PRECISIONS)):
    raise ValueError(f"{fn}: precision={precision!r}; expected None, one of {PRECISIONS} "
                     f"or a jax.lax.Precision")
  if not 0.0 <= dropout_rate < 1.0:
    raise ValueError(f"{fn}: dropout_rate={dropout_rate}; expected 0 <= rate < 1")


def split_segment_ids(segment_ids: Any) -> tuple[Array | None, Array | None]:
  """``(q_ids, kv_ids)`` from one ``[B, L]`` array, a pair, or None."""
  if segment_ids is None:
    return None, None
  if isinstance(segment_ids, Sequence):
    return jnp.asarray(segment_ids[0]), jnp.asarray(segment_ids[1])
  ids = jnp.asarray(segment_ids)
  return ids, ids
