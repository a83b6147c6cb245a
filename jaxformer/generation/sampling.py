"""Logits processors and token sampling: pure, jittable functions of ``[batch, vocab]`` logits.

The processors return *logits* in which every removed token is ``-inf``, so that
``jax.nn.softmax`` of the result is the renormalised distribution over the kept tokens.
``sample_token`` applies them in the usual order (temperature, then top-k, then top-p on the
distribution that top-k left) and draws one token per row.

Static versus traced arguments: ``top_k`` must be a Python ``int`` (it fixes a shape);
``temperature`` and ``top_p`` may be Python floats or traced scalars, so a jitted caller
need not recompile when they change. ``temperature == 0`` means greedy (arg-max) decoding.
"""

from __future__ import annotations

import numbers
from typing import Any

import jax
import jax.numpy as jnp

Array = jax.Array

_NEG_INF = -jnp.inf


def _check_logits(logits_BV: Any, name: str = "logits_BV") -> None:
  if getattr(logits_BV, "ndim", None) != 2:
    raise ValueError(
        f"{name} must be [batch, vocab] (2-D); got shape {getattr(logits_BV, 'shape', None)}")


def _check_temperature(temperature: Any) -> None:
  if isinstance(temperature, numbers.Real) and not temperature >= 0:
    raise ValueError(f"temperature must be >= 0 (0 = greedy); got {temperature!r}")


def _check_top_k(top_k: Any) -> None:
  if top_k is None:
    return
  if isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral):
    raise TypeError(f"top_k must be a Python int >= 1 or None; got {top_k!r}")
  if top_k < 1:
    raise ValueError(f"top_k must be >= 1 or None; got {top_k!r}")


def _check_top_p(top_p: Any) -> None:
  if top_p is None:
    return
  if isinstance(top_p, numbers.Real) and not 0.0 < top_p <= 1.0:
    raise ValueError(f"top_p must be in (0, 1] or None; got {top_p!r}")


def greedy(logits_BV: Array) -> Array:
  """Arg-max token per row.

  Args:
    logits_BV: [batch, vocab].
  Returns:
    int32 [batch]; the lowest index among ties.
  """
  _check_logits(logits_BV)
  return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)


def apply_temperature(logits_BV: Array, temperature: float | Array) -> Array:
  """Divides logits by ``temperature`` (> 0), in float32.

  Args:
    logits_BV: [batch, vocab].
    temperature: a positive scalar (Python float or traced). ``0`` is greedy decoding, which
      is not a distribution: use ``greedy`` or ``sample_token`` for it.
  Returns:
    float32 [batch, vocab].
  """
  _check_logits(logits_BV)
  if isinstance(temperature, numbers.Real) and not temperature > 0:
    raise ValueError(
        f"apply_temperature needs temperature > 0; got {temperature!r} (use greedy() for 0)")
  return logits_BV.astype(jnp.float32) / jnp.asarray(temperature, jnp.float32)


def _scatter_rows(mask_sorted_BV: Array, idx_BV: Array) -> Array:
  """Scatters ``mask_sorted_BV[b, j]`` to position ``idx_BV[b, j]`` of each row."""
  rows_B1 = jnp.arange(idx_BV.shape[0])[:, None]
  rows_BV = jnp.broadcast_to(rows_B1, idx_BV.shape)
  return jnp.zeros(idx_BV.shape, jnp.bool_).at[rows_BV, idx_BV].set(mask_sorted_BV)


def top_k_filter(logits_BV: Array, top_k: int) -> Array:
  """Keeps exactly the ``top_k`` largest logits of each row; the rest become ``-inf``.

  Ties at the k-th value are broken towards the lower token index (as ``lax.top_k`` does),
  so exactly ``min(top_k, vocab)`` tokens survive.

  Args:
    logits_BV: [batch, vocab].
    top_k: a Python int >= 1; values >= vocab keep everything.
  Returns:
    [batch, vocab], dtype of ``logits_BV``.
  """
  _check_logits(logits_BV)
  _check_top_k(top_k)
  vocab = logits_BV.shape[-1]
  if top_k >= vocab:
    return logits_BV
  _, idx_BK = jax.lax.top_k(logits_BV, top_k)
  keep_BK = jnp.ones(idx_BK.shape, jnp.bool_)
  rows_BK = jnp.broadcast_to(jnp.arange(idx_BK.shape[0])[:, None], idx_BK.shape)
  keep_BV = jnp.zeros(logits_BV.shape, jnp.bool_).at[rows_BK, idx_BK].set(keep_BK)
  return jnp.where(keep_BV, logits_BV, jnp.asarray(_NEG_INF, logits_BV.dtype))


def top_p_filter(logits_BV: Array, top_p: float | Array) -> Array:
  """Nucleus filtering: keeps the smallest set of most-likely tokens whose mass is >= top_p.

  Tokens are ranked by probability (ties towards the lower index); token at rank ``r`` is
  kept iff the total probability of the tokens ranked before it is ``< top_p``. The most
  likely token is therefore always kept, and ``top_p = 1`` keeps every token of non-zero
  probability (up to float32 rounding of the cumulative sum).

  Args:
    logits_BV: [batch, vocab]; may already contain ``-inf`` (e.g. after ``top_k_filter``).
    top_p: in (0, 1], Python float or traced scalar.
  Returns:
    [batch, vocab], dtype of ``logits_BV``; softmax of it is the renormalised nucleus.
  """
  _check_logits(logits_BV)
  _check_top_p(top_p)
  if isinstance(top_p, numbers.Real) and top_p >= 1.0:
    return logits_BV
  probs_BV = jax.nn.softmax(logits_BV.astype(jnp.float32), axis=-1)
  order_BV = jnp.argsort(-probs_BV, axis=-1, stable=True)
  sorted_BV = jnp.take_along_axis(probs_BV, order_BV, axis=-1)
  mass_before_BV = jnp.cumsum(sorted_BV, axis=-1) - sorted_BV
  keep_sorted_BV = mass_before_BV < jnp.asarray(top_p, jnp.float32)
  keep_sorted_BV = keep_sorted_BV.at[:, 0].set(True)
  keep_BV = _scatter_rows(keep_sorted_BV, order_BV)
  return jnp.where(keep_BV, logits_BV, jnp.asarray(_NEG_INF, logits_BV.dtype))


def process_logits(logits_BV: Array, *, temperature: float | Array = 1.0,
                   top_k: int | None = None, top_p: float | Array | None = None) -> Array:
  """Temperature, then top-k, then top-p; returns float32 logits with ``-inf`` for removed.

  Args:
    logits_BV: [batch, vocab].
    temperature: > 0 (this function defines a distribution; greedy has none).
    top_k: Python int >= 1 or None (no top-k).
    top_p: in (0, 1] or None (no nucleus filtering).
  Returns:
    float32 [batch, vocab].
  """
  _check_top_k(top_k)
  _check_top_p(top_p)
  out_BV = apply_temperature(logits_BV, temperature)
  if top_k is not None:
    out_BV = top_k_filter(out_BV, top_k)
  if top_p is not None:
    out_BV = top_p_filter(out_BV, top_p)
  return out_BV


def sample_token(rng: Array, logits_BV: Array, *, temperature: float | Array = 1.0,
                 top_k: int | None = None, top_p: float | Array | None = None) -> Array:
  """Draws one token per row from the processed distribution.

  Args:
    rng: a PRNG key (one key for the whole batch).
    logits_BV: [batch, vocab].
    temperature: >= 0; 0 means greedy (arg-max, ``rng`` unused). A traced temperature
      selects greedy rows with ``jnp.where`` (both branches are computed).
    top_k: Python int >= 1 or None.
    top_p: in (0, 1] or None.
  Returns:
    int32 [batch].
  """
  _check_logits(logits_BV)
  _check_temperature(temperature)
  _check_top_k(top_k)
  _check_top_p(top_p)
  if isinstance(temperature, numbers.Real) and temperature == 0:
    return greedy(logits_BV)
  temp = jnp.asarray(temperature, jnp.float32)
  is_greedy = temp == 0
  safe_temp = jnp.where(is_greedy, jnp.ones_like(temp), temp)
  processed_BV = process_logits(logits_BV, temperature=safe_temp, top_k=top_k, top_p=top_p)
  sampled_B = jax.random.categorical(rng, processed_BV, axis=-1).astype(jnp.int32)
  if isinstance(temperature, numbers.Real):
    return sampled_B
  return jnp.where(is_greedy, greedy(logits_BV), sampled_B)
