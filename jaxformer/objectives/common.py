"""Weighted cross-entropy shared by all objectives (float32 statistics)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

LN2 = math.log(2.0)


def check_logits_targets(logits, targets, weights, *, what: str) -> None:
  """Raises ValueError unless ``logits [..., V]``, ``targets [...]``, ``weights [...]``."""
  if logits.ndim != targets.ndim + 1 or logits.shape[:-1] != targets.shape:
    raise ValueError(f"{what}: logits {logits.shape} must be targets {targets.shape} "
                     "plus a trailing vocabulary axis.")
  if weights is not None and weights.shape != targets.shape:
    raise ValueError(f"{what}: weights {weights.shape} must have the shape of "
                     f"targets {targets.shape}.")
  if not jnp.issubdtype(targets.dtype, jnp.integer):
    raise TypeError(f"{what}: targets must be integer ids, got {targets.dtype}.")


def cross_entropy_sums(logits, targets, weights, *, label_smoothing: float = 0.0):
  """Weighted sums of the per-token losses.

  Args:
    logits: ``[..., V]``, any float dtype (computed in float32).
    targets: ``[...]`` int ids in ``[0, V)``.
    weights: ``[...]`` float, or None for all ones.
    label_smoothing: ``eps``; the target distribution is ``(1 - eps) * onehot +
      eps / V``.

  Returns:
    ``(loss_sum, nll_sum, correct_sum, weight_sum)``, float32 scalars: the smoothed
    cross-entropy, the plain negative log-likelihood, the number of arg-max hits and the
    total weight, all weighted.
  """
  if not 0.0 <= label_smoothing < 1.0:
    raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}.")
  logits = logits.astype(jnp.float32)
  if weights is None:
    weights = jnp.ones(targets.shape, jnp.float32)
  weights = weights.astype(jnp.float32)
  lse = jax.nn.logsumexp(logits, axis=-1)
  target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  nll = lse - target_logit
  if label_smoothing:
    mean_logit = jnp.mean(logits, axis=-1)
    # -sum_v q_v log p_v with q = (1 - eps) onehot + eps / V.
    per_token = (1.0 - label_smoothing) * nll + label_smoothing * (lse - mean_logit)
  else:
    per_token = nll
  correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
  return (jnp.sum(per_token * weights), jnp.sum(nll * weights),
          jnp.sum(correct * weights), jnp.sum(weights))


def safe_div(num, den):
  """``num / den``, or 0 where ``den == 0``."""
  return jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), 0.0)


def mean_metrics(loss_sum, nll_sum, correct_sum, weight_sum, *,
                 prefix: str = "") -> tuple[jax.Array, dict[str, jax.Array]]:
  """``(loss, metrics)`` from :func:`cross_entropy_sums`."""
  loss = safe_div(loss_sum, weight_sum)
  nll = safe_div(nll_sum, weight_sum)
  metrics = {
      f"{prefix}loss": loss,
      f"{prefix}nll": nll,
      f"{prefix}accuracy": safe_div(correct_sum, weight_sum),
      f"{prefix}num_tokens": weight_sum,
  }
  return loss, metrics
