"""Tasks: the loss of one objective, ``(model, params, batch, rng, deterministic) ->
(loss, metrics)``, picked by name from :data:`TASKS` (``config.task``).

A task knows which batch features its model takes and which objective scores the
output; the train/eval steps know nothing else about the objective. To add one (masked
LM, seq2seq, classification, ...), write a function with this signature next to the
objective and add it to :data:`TASKS`.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax

from jaxformer.objectives import causal_lm
from jaxformer.training.steps import Batch, Metrics, TaskFn


def causal_lm_task(model: nn.Module, params: Any, batch: Batch,
                   rng: jax.Array | None, deterministic: bool
                   ) -> tuple[jax.Array, Metrics]:
  """Next-token prediction on a packed LM batch.

  Args:
    model: a decoder-only LM, ``(inputs_BL, segment_ids=, positions=,
      deterministic=) -> logits_BLV``.
    params: its parameters.
    batch: ``inputs``/``targets``/``weights`` ``[B, L]`` and optionally
      ``segment_ids``/``positions`` ``[B, L]`` (packed documents).
    rng: dropout key (None when deterministic).
    deterministic: disables dropout.
  Returns:
    ``causal_lm.loss`` of the logits: ``(loss, metrics)``.
  """
  rngs = {"dropout": rng} if rng is not None and not deterministic else {}
  logits_BLV = model.apply(
      {"params": params}, batch["inputs"],
      segment_ids=batch.get("segment_ids"), positions=batch.get("positions"),
      deterministic=deterministic, rngs=rngs)
  return causal_lm.loss(logits_BLV, batch["targets"], batch.get("weights"))


TASKS: dict[str, TaskFn] = {
    "causal_lm": causal_lm_task,
}


def get_task(name: str) -> TaskFn:
  """The task registered as ``name`` (ValueError listing the known ones)."""
  try:
    return TASKS[name]
  except KeyError:
    raise ValueError(
        f"task={name!r} is not a known task; known: {sorted(TASKS)}") from None
