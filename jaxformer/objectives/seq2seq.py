"""Sequence-to-sequence (teacher forcing) objective with label smoothing."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxformer.objectives import common


def loss(logits_BLV: jax.Array, targets_BL: jax.Array,
         weights_BL: jax.Array | None = None, *, pad_id: int | None = None,
         label_smoothing: float = 0.1) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Label-smoothed cross-entropy over the real target tokens.

  The smoothed target distribution is ``(1 - eps) * onehot + eps / V``; the loss is
  its cross-entropy with the model (so its minimum is the distribution's entropy, not
  0); ``nll`` in the metrics is the unsmoothed negative log-likelihood.

  Args:
    logits_BLV: ``[batch, length, vocab]`` decoder logits.
    targets_BL: ``[batch, length]`` target ids.
    weights_BL: ``[batch, length]`` token weights (the pipeline's ``weights``).
    pad_id: if ``weights_BL`` is None, weights are ``targets_BL != pad_id``.
    label_smoothing: ``eps`` in ``[0, 1)``.

  Returns:
    ``(loss, metrics)``: ``loss``, ``nll``, ``accuracy``, ``num_tokens``, float32.
  """
  if weights_BL is None:
    if pad_id is None:
      raise ValueError("seq2seq.loss needs weights_BL or pad_id to ignore padding.")
    weights_BL = (targets_BL != pad_id).astype(jnp.float32)
  common.check_logits_targets(logits_BLV, targets_BL, weights_BL, what="seq2seq.loss")
  return common.mean_metrics(*common.cross_entropy_sums(
      logits_BLV, targets_BL, weights_BL, label_smoothing=label_smoothing))
