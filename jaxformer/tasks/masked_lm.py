"""Masked language modelling (BERT pre-training), optionally with next-sentence
prediction.

Masking happens inside the step with the step's key (a fresh mask every step); eval
(``rng=None``) masks with the fixed key ``EVAL_MASK_SEED``, so every eval sees the
same masks.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxformer.data import nsp_pairs
from jaxformer.data import pipeline
from jaxformer.objectives import masked_lm
from jaxformer.objectives import nsp as nsp_lib
from jaxformer.tasks import base

EVAL_MASK_SEED = 0


def valid_mask(batch: base.Batch) -> jax.Array:
  """``[B, L]`` bool, True on real tokens: ``inputs_mask``, else ``segment_ids > 0``."""
  if "inputs_mask" in batch:
    return jnp.asarray(batch["inputs_mask"]).astype(bool)
  if "segment_ids" in batch:
    return jnp.asarray(batch["segment_ids"]) > 0
  return jnp.ones(jnp.shape(batch["inputs"]), bool)


class MaskedLM(base.Task):
  """BERT pre-training: masked LM, plus NSP when ``task_options.nsp``.

  Data (``data.pipeline``): ``"nsp_pairs"`` (default), sentence pairs
  ``[CLS] A [SEP] B [SEP]`` with ``nsp_label`` (:mod:`jaxformer.data.nsp_pairs`: the
  first ``data.max_documents`` records cut at ``data.segment_separator`` into at most
  ``data.max_segments`` segments of <= ``seq_len // 2`` tokens; ``data.num_pairs`` /
  ``data.num_eval_pairs`` pairs), or ``"lm"``, packed text (no NSP).
  Model: ``BERT`` with ``mlm_head`` (and ``nsp_head`` with NSP),
  ``(inputs, token_types, attention_mask) -> {"mlm_logits", "nsp_logits"}``.
  Options: ``nsp``; ``mask_rate``, ``replace_mask``, ``replace_random`` (see
  :func:`jaxformer.objectives.masked_lm.mask_tokens`).
  Metrics: ``loss``, ``mlm_loss``, ``nll``/``accuracy`` (MLM, over the chosen
  positions), ``num_tokens``; with NSP ``nsp_loss``, ``nsp_accuracy``.
  """

  name = "masked_lm"
  OPTIONS = dict(nsp=False, mask_rate=0.15, replace_mask=0.8, replace_random=0.1)

  def batches(self, *, batch_size: int, seed: int, train: bool) -> Any:
    data, tok = self.data, self.tokenizer
    kwargs = self.example_kwargs(batch_size=batch_size, seed=seed, train=train)
    if data.get("pipeline", "nsp_pairs") == "lm":
      kwargs.update(seed=seed if train else 0, streams=None if train else 1)
      return pipeline.lm_pipeline(self.source(train), tok, seq_len=data["seq_len"],
                                  pack=data.get("pack", True), **kwargs)
    seq_len = data["seq_len"]
    documents = nsp_pairs.segment_documents(
        self.source(train), tok, separator=data.get("segment_separator", "\n\n"),
        max_segment_tokens=max(seq_len // 2, 1),
        max_documents=data.get("max_documents", 1000),
        max_segments=data.get("max_segments"), text_key=data.get("text_key", "text"))
    pairs = nsp_pairs.NSPSource(
        documents, seq_len=seq_len, cls_id=tok.cls_id, sep_id=tok.sep_id,
        pad_id=tok.pad_id, seed=seed if train else 1,
        num_examples=data.get("num_pairs" if train else "num_eval_pairs",
                              100_000 if train else 1_000))
    return pipeline.example_pipeline(pairs, **kwargs)

  def model_inputs(self, batch: base.Batch) -> tuple[Any, ...]:
    return batch["inputs"], batch.get("token_types"), valid_mask(batch)

  def loss(self, model: nn.Module, params: Any, batch: base.Batch,
           rng: jax.Array | None, deterministic: bool
           ) -> tuple[jax.Array, base.Metrics]:
    opts, tok = self.options, self.tokenizer
    if rng is None:
      mask_key, dropout_key = jax.random.key(EVAL_MASK_SEED), None
    else:
      mask_key, dropout_key = jax.random.split(rng)
    inputs_BL, targets_BL, weights_BL = masked_lm.mask_tokens(
        mask_key, batch["inputs"], vocab_size=tok.vocab_size, mask_id=tok.mask_id,
        special_ids=tok.special_ids, mask_rate=opts["mask_rate"],
        replace_mask=opts["replace_mask"], replace_random=opts["replace_random"])
    weights_BL = weights_BL * valid_mask(batch).astype(jnp.float32)
    out = self.apply(model, params, dict(batch, inputs=inputs_BL), dropout_key,
                     deterministic)
    if "mlm_logits" not in out:
      raise ValueError("task='masked_lm' needs a BERT with model.mlm_head=True")
    loss, metrics = masked_lm.loss(out["mlm_logits"], targets_BL, weights_BL)
    metrics["mlm_loss"] = loss
    if opts["nsp"]:
      if "nsp_logits" not in out:
        raise ValueError("task_options.nsp=True needs model.nsp_head=True")
      nsp_loss, nsp_metrics = nsp_lib.loss(out["nsp_logits"], batch["nsp_label"],
                                           batch.get("weights"))
      loss = loss + nsp_loss
      metrics["nsp_loss"] = nsp_loss
      metrics["nsp_accuracy"] = nsp_metrics["accuracy"]
    metrics["loss"] = loss
    return loss, metrics
