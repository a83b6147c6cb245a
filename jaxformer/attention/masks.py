"""Boolean attention masks: ``True`` = may attend, shaped ``[batch | 1, 1, q_len, kv_len]``.

Every mask of the code base is built here: ``dot_product_attention``'s reference path
turns its ``is_causal`` flag and ``segment_ids`` into :func:`make_causal_mask` and
:func:`make_segment_mask` (the fast paths never build an N x N mask), and the models
mask padded keys with :func:`make_key_mask`. Masks compose with ``combine_masks``
(logical and) instead of multiplying special cases.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def make_causal_mask(q_length: int, kv_length: int | None = None) -> Array:
  """Causal mask, bottom-right aligned when ``q_length < kv_length``.

  Query ``i`` sits at absolute position ``i + kv_length - q_length`` and may attend to
  keys at positions ``<=`` its own (the convention of incremental decoding, where the
  queries are the last ``q_length`` tokens of the sequence).

  Args:
    q_length: number of queries.
    kv_length: number of keys; defaults to ``q_length``.
  Returns:
    mask: bool ``[1, 1, q_length, kv_length]``.
  """
  kv_length = q_length if kv_length is None else kv_length
  for name, value in (("q_length", q_length), ("kv_length", kv_length)):
    if not isinstance(value, int) or value < 0:
      raise ValueError(f"make_causal_mask: {name}={value!r}; expected an int >= 0")
  q_pos_Q = jnp.arange(q_length) + (kv_length - q_length)
  k_pos_K = jnp.arange(kv_length)
  return (q_pos_Q[:, None] >= k_pos_K[None, :])[None, None]


def make_prefix_mask(q_positions: jax.typing.ArrayLike, kv_length: int) -> Array:
  """Causal mask for queries at given absolute positions (a KV cache's decoding step).

  Args:
    q_positions: int ``[q_len]``, each query's position in the sequence (may be
      traced, e.g. ``cache_index + arange(q_len)``).
    kv_length: number of key slots (positions ``0 .. kv_length - 1``).
  Returns:
    mask: bool ``[1, 1, q_len, kv_length]``, True where key position <= query position.
  """
  q_pos_Q = jnp.asarray(q_positions)
  return (jnp.arange(kv_length)[None, :] <= q_pos_Q[:, None])[None, None]


def make_padding_mask(q_valid: jax.typing.ArrayLike,
                      kv_valid: jax.typing.ArrayLike | None = None) -> Array:
  """Padding mask from per-token validity.

  Args:
    q_valid: ``[batch, q_len]``, bool or numeric (non-zero = a real token), e.g.
      ``tokens != pad_id``.
    kv_valid: ``[batch, kv_len]``; defaults to ``q_valid`` (self attention).
  Returns:
    mask: bool ``[batch, 1, q_len, kv_len]``, True where both query and key are real.
    Rows of padded queries are fully masked (attention returns zeros there).
  """
  q_valid = jnp.asarray(q_valid)
  kv_valid = q_valid if kv_valid is None else jnp.asarray(kv_valid)
  _check_pair("make_padding_mask", "q_valid", q_valid, "kv_valid", kv_valid)
  q_valid = q_valid.astype(bool)
  kv_valid = kv_valid.astype(bool)
  return q_valid[:, None, :, None] & kv_valid[:, None, None, :]


def make_key_mask(kv_valid: jax.typing.ArrayLike) -> Array:
  """Keys-only padding mask: every query may attend to the real keys.

  Args:
    kv_valid: ``[batch, kv_len]``, bool or numeric (non-zero = a real token).
  Returns:
    mask: bool ``[batch, 1, 1, kv_len]`` (padded queries still attend, to real keys).
  """
  kv_valid = jnp.asarray(kv_valid)
  if kv_valid.ndim != 2:
    raise ValueError(f"make_key_mask: kv_valid must be [batch, kv_len]; got shape "
                     f"{kv_valid.shape}")
  return kv_valid.astype(bool)[:, None, None, :]


def make_segment_mask(q_segment_ids: jax.typing.ArrayLike,
                      kv_segment_ids: jax.typing.ArrayLike | None = None) -> Array:
  """Block-diagonal mask for packed sequences: attend iff the segment ids are equal.

  Args:
    q_segment_ids: int ``[batch, q_len]``.
    kv_segment_ids: int ``[batch, kv_len]``; defaults to ``q_segment_ids``.
  Returns:
    mask: bool ``[batch, 1, q_len, kv_len]``.
  """
  q_ids = jnp.asarray(q_segment_ids)
  kv_ids = q_ids if kv_segment_ids is None else jnp.asarray(kv_segment_ids)
  _check_pair("make_segment_mask", "q_segment_ids", q_ids, "kv_segment_ids", kv_ids)
  return q_ids[:, None, :, None] == kv_ids[:, None, None, :]


def combine_masks(*masks: jax.typing.ArrayLike | None) -> Array | None:
  """Logical ``and`` of rank-4 boolean masks; ``None`` entries are skipped.

  Returns:
    The broadcast conjunction, or ``None`` if every mask is ``None``.
  """
  present = [jnp.asarray(m) for m in masks if m is not None]
  if not present:
    return None
  for m in present:
    if m.ndim != 4:
      raise ValueError(f"combine_masks: expected rank-4 masks [batch, heads, q, kv], got "
                       f"shape {m.shape}")
  out = present[0].astype(bool)
  for m in present[1:]:
    out = jnp.logical_and(out, m.astype(bool))
  return out


def _check_pair(fn: str, qname: str, q: Array, kname: str, k: Array) -> None:
  if q.ndim != 2 or k.ndim != 2:
    raise ValueError(f"{fn}: {qname} and {kname} must be [batch, length]; got shapes "
                     f"{q.shape} and {k.shape}")
  if q.shape[0] != k.shape[0]:
    raise ValueError(f"{fn}: batch of {qname} {q.shape} != batch of {kname} {k.shape}")
