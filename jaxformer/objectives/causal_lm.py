"""Causal (next-token) language-modelling loss."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxformer.objectives import common


def loss(logits_BLV: jax.Array, targets_BL: jax.Array,
         weights_BL: jax.Array | None = None, *,
         label_smoothing: float = 0.0) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Mean next-token cross-entropy over the weighted targets, in float32.

  Args:
    logits_BLV: ``[batch, length, vocab]`` next-token logits (any float dtype).
    targets_BL: ``[batch, length]`` int target ids (the LM batch's ``targets``).
    weights_BL: ``[batch, length]`` float weights (the LM batch's ``weights``); None
      counts every position.
    label_smoothing: see :func:`jaxformer.objectives.common.cross_entropy_sums`.

  Returns:
    ``(loss, metrics)``: ``loss = sum(w * ce) / sum(w)`` (0 when ``sum(w) == 0``);
    metrics ``loss``, ``nll`` (unsmoothed), ``accuracy`` (weighted arg-max hits),
    ``num_tokens`` (``sum(w)``), ``bits_per_token`` (``nll / ln 2``), all float32
    scalars.
  """
  common.check_logits_targets(logits_BLV, targets_BL, weights_BL,
                              what="causal_lm.loss")
  if logits_BLV.ndim != 3:
    raise ValueError(f"causal_lm.loss: logits_BLV must be [batch, length, vocab], got "
                     f"shape {logits_BLV.shape}.")
  sums = common.cross_entropy_sums(logits_BLV, targets_BL, weights_BL,
                                   label_smoothing=label_smoothing)
  value, metrics = common.mean_metrics(*sums)
  metrics["bits_per_token"] = metrics["nll"] / jnp.float32(common.LN2)
  return value, metrics
