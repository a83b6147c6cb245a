"""BERT next-sentence prediction: the loss (pairs are data: ``jaxformer.data.nsp_pairs``).

Labels follow the Hugging Face convention: 0 = B follows A in its document, 1 = B is a
random segment of another document.
"""

from __future__ import annotations

import jax

from jaxformer.objectives import classification


def loss(logits_B2: jax.Array, labels_B: jax.Array, weights_B: jax.Array | None = None
         ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Binary NSP cross-entropy: ``logits_B2 [batch, 2]``, ``labels_B [batch]``.

  Returns:
    ``(loss, metrics)`` with ``loss``, ``nll``, ``accuracy``, ``num_examples``.
  """
  if logits_B2.ndim != 2 or logits_B2.shape[-1] != 2:
    raise ValueError(f"logits_B2 must be [batch, 2], got {logits_B2.shape}.")
  return classification.loss(logits_B2, labels_B, weights_B)
