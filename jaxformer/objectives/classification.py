"""Classification loss: softmax cross-entropy and accuracy."""

from __future__ import annotations

import jax

from jaxformer.objectives import common


def loss(logits_BC: jax.Array, labels_B: jax.Array, weights_B: jax.Array | None = None,
         *, label_smoothing: float = 0.0) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Mean cross-entropy over the (weighted) examples, in float32.

  Args:
    logits_BC: ``[batch, classes]``.
    labels_B: ``[batch]`` int class ids.
    weights_B: ``[batch]`` example weights (the pipelines' ``weights``: 0 on rows
      padding a short batch); None = all ones.
    label_smoothing: see :func:`jaxformer.objectives.common.cross_entropy_sums`.

  Returns:
    ``(loss, metrics)``: metrics ``loss``, ``nll``, ``accuracy``, ``num_examples``.
  """
  common.check_logits_targets(logits_BC, labels_B, weights_B,
                              what="classification.loss")
  value, metrics = common.mean_metrics(*common.cross_entropy_sums(
      logits_BC, labels_B, weights_B, label_smoothing=label_smoothing))
  metrics["num_examples"] = metrics.pop("num_tokens")
  return value, metrics
