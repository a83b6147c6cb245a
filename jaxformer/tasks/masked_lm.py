"""Masked language modelling (BERT pre-training), optionally with next-sentence
prediction.

Masking happens inside the step with the step's key (a fresh mask every step); eval
(``rng=None``) masks with the fixed key ``EVAL_MASK_SEED``, so every eval sees the
same masks.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxformer.data import nsp_pairs
from jaxformer.data import pipeline
from jaxformer.data.config import DataConfig
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


PIPELINES = ("nsp_pairs", "lm")


@dataclasses.dataclass(frozen=True, kw_only=True)
class PairsData(DataConfig):
  """``data`` of masked LM (see :class:`MaskedLM`)."""
  seq_len: int = dataclasses.field()  # required (the base class has a default)
  pipeline: str = "nsp_pairs"
  pack: bool = True
  segment_separator: str = "\n\n"
  max_documents: int = 1000
  max_segments: int | None = None
  num_pairs: int = 100_000
  num_eval_pairs: int = 1_000

  def __post_init__(self):
    super().__post_init__()
    if self.pipeline not in PIPELINES:
      raise ValueError(f"data.pipeline={self.pipeline!r} is not one of {PIPELINES}")


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

  @dataclasses.dataclass(frozen=True, kw_only=True)
  class Options:
    nsp: bool = False
    mask_rate: float = 0.15
    replace_mask: float = 0.8
    replace_random: float = 0.1

  name = "masked_lm"
  Data = PairsData

  def batches(self, *, batch_size: int, seed: int, train: bool) -> Any:
    data, tok = self.data, self.tokenizer
    if data.pipeline == "lm":
      options = self.read_options(batch_size=batch_size, seed=seed if train else 0,
                                  train=train)
      return pipeline.read_lm(self.source(train), tok, options, seq_len=data.seq_len,
                              pack=data.pack, text_key=data.text_key,
                              streams=None if train else 1)
    seq_len = data.seq_len
    documents = nsp_pairs.segment_documents(
        self.source(train), tok, separator=data.segment_separator,
        max_segment_tokens=max(seq_len // 2, 1), max_documents=data.max_documents,
        max_segments=data.max_segments, text_key=data.text_key)
    pairs = nsp_pairs.NSPSource(
        documents, seq_len=seq_len, cls_id=tok.cls_id, sep_id=tok.sep_id,
        pad_id=tok.pad_id, seed=seed if train else 1,
        num_examples=data.num_pairs if train else data.num_eval_pairs)
    return pipeline.read(pairs, None, self.read_options(
        batch_size=batch_size, seed=seed, train=train))

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
        special_ids=tok.special_ids, mask_rate=opts.mask_rate,
        replace_mask=opts.replace_mask, replace_random=opts.replace_random)
    weights_BL = weights_BL * valid_mask(batch).astype(jnp.float32)
    out = self.apply(model, params, dict(batch, inputs=inputs_BL), dropout_key,
                     deterministic)
    if "mlm_logits" not in out:
      raise ValueError("task='masked_lm' needs a BERT with model.mlm_head=True")
    loss, metrics = masked_lm.loss(out["mlm_logits"], targets_BL, weights_BL)
    metrics["mlm_loss"] = loss
    if opts.nsp:
      if "nsp_logits" not in out:
        raise ValueError("task_options.nsp=True needs model.nsp_head=True")
      nsp_loss, nsp_metrics = nsp_lib.loss(out["nsp_logits"], batch["nsp_label"],
                                           batch.get("weights"))
      loss = loss + nsp_loss
      metrics["nsp_loss"] = nsp_loss
      metrics["nsp_accuracy"] = nsp_metrics["accuracy"]
    metrics["loss"] = loss
    return loss, metrics
