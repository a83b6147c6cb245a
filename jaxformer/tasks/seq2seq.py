"""Sequence to sequence: teacher-forced encoder-decoder training, BLEU at eval.

BLEU (``task_options.bleu_batches > 0``): the first ``bleu_batches`` eval batches are
decoded greedily with :func:`jaxformer.generation.seq2seq.generate_seq2seq` (KV cache
for ``data.target_len`` tokens, capped by ``model.max_len``), cut at the first ``EOS``
and detokenized (special tokens dropped); the reference is the batch's ``targets`` row
treated the same way. Corpus BLEU (sacrebleu) in [0, 100] with sacrebleu's
tokenisation ``bleu_tokenize`` (``"13a"``: words; ``"char"`` for text without spaces
such as the synthetic reversal strings, where word 4-grams never occur). Several
processes decode one global batch as one SPMD program and gather the tokens, so every
process computes the same BLEU. Without sacrebleu (an optional dependency) a warning is
logged once and there is no ``eval_bleu``.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from jaxformer.data import pipeline
from jaxformer.data.config import DataConfig
from jaxformer.generation import metrics as gen_metrics
from jaxformer.generation import seq2seq as seq2seq_gen
from jaxformer.objectives import seq2seq
from jaxformer.tasks import base

log = logging.getLogger(__name__)


def ids_to_text(ids: Sequence[int], tokenizer: Any) -> str:
  """Token ids -> text: cut before the first ``EOS``, special tokens dropped."""
  ids = [int(i) for i in ids]
  if tokenizer.eos_id in ids:
    ids = ids[:ids.index(tokenizer.eos_id)]
  return tokenizer.decode(ids)


def decode_batch(runtime: base.Runtime, params: Any, batch: Mapping[str, np.ndarray],
                 tokenizer: Any, *, max_new_tokens: int) -> tuple[list[str], list[str]]:
  """Greedy translations and references of one host batch of the seq2seq pipeline.

  Args:
    runtime: the run's model, batch sharding and host transfer.
    params: the model's parameters (sharded as in training).
    batch: this process's rows: ``inputs``/``inputs_mask`` ``[b, Ls]``, ``targets``
      ``[b, Lt]``; rows whose ``weights`` are all zero (padding) are left out.
    tokenizer: the run's tokenizer.
    max_new_tokens: decoding steps after ``BOS``.
  Returns:
    ``(hypotheses, references)`` of the whole global batch, as strings.
  """
  keys = ("inputs", "inputs_mask", "targets", "weights")
  global_batch = runtime.shard({k: np.asarray(batch[k]) for k in keys if k in batch})
  with runtime.activate():
    tokens_BT, _ = seq2seq_gen.generate_seq2seq(
        runtime.model, params, global_batch["inputs"],
        source_mask=global_batch["inputs_mask"], max_new_tokens=max_new_tokens,
        bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id,
        temperature=0.0)
  tokens_BT, targets_BT = runtime.to_host((tokens_BT, global_batch["targets"]))
  if "weights" in global_batch:
    real_B = np.asarray(runtime.to_host(global_batch["weights"])).sum(axis=-1) > 0
  else:
    real_B = np.ones(targets_BT.shape[0], bool)
  hyps = [ids_to_text(row[1:], tokenizer) for row in np.asarray(tokens_BT)[real_B]]
  refs = [ids_to_text(row, tokenizer) for row in np.asarray(targets_BT)[real_B]]
  return hyps, refs


def bleu_of_batches(runtime: base.Runtime, params: Any,
                    batches: Sequence[Mapping[str, np.ndarray]], tokenizer: Any, *,
                    max_new_tokens: int, tokenize: str | None = None) -> float:
  """Corpus BLEU (0..100) of greedy translations of ``batches`` (module docstring)."""
  hyps: list[str] = []
  refs: list[str] = []
  for batch in batches:
    h, r = decode_batch(runtime, params, batch, tokenizer,
                        max_new_tokens=max_new_tokens)
    hyps += h
    refs += r
  kwargs = {} if tokenize is None else {"tokenize": tokenize}
  return gen_metrics.bleu(hyps, refs, **kwargs)


def _sacrebleu_available() -> bool:
  return importlib.util.find_spec("sacrebleu") is not None


def _sacrebleu_tokenizers() -> tuple[str, ...] | None:
  """Names sacrebleu's BLEU accepts for ``tokenize`` (None if it does not say)."""
  from sacrebleu.metrics import BLEU  # pylint: disable=g-import-not-at-top
  names = getattr(BLEU, "TOKENIZERS", None)
  return None if names is None else tuple(names)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Seq2SeqData(DataConfig):
  """``data`` of sequence to sequence: the source and target features and their
  lengths in tokens (``EOS`` included)."""
  source_len: int
  target_len: int
  source_key: str = "source"
  target_key: str = "target"

  def __post_init__(self):
    super().__post_init__()
    for name in ("source_len", "target_len"):
      if getattr(self, name) < 1:
        raise ValueError(f"data.{name}={getattr(self, name)!r} must be an int >= 1")


class Seq2Seq(base.Task):
  """Encoder-decoder training with teacher forcing and label smoothing.

  Batches: :class:`jaxformer.data.pipeline.EncodeSeq2Seq` (``data.source_len``,
  ``target_len``, ``source_key``, ``target_key``). Model: ``EncoderDecoder``,
  ``(inputs, decoder_inputs, inputs_mask) -> logits_BTV``.
  Options: ``label_smoothing``; ``bleu_batches`` (0: no BLEU), ``bleu_tokenize``.
  Metrics: ``loss`` (smoothed), ``nll``, ``accuracy`` per target token,
  ``num_tokens``; eval adds ``bleu``.
  """

  @dataclasses.dataclass(frozen=True, kw_only=True)
  class Options:
    label_smoothing: float = 0.1
    bleu_batches: int = 0
    bleu_tokenize: str | None = None

  name = "seq2seq"
  Data = Seq2SeqData

  def __init__(self, *args, **kwargs):
    super().__init__(*args, **kwargs)
    num = self.options.bleu_batches
    if num < 0:
      raise ValueError(f"task_options.bleu_batches={num!r} must be an int >= 0 "
                       "(0 = no BLEU)")
    self._bleu = num > 0
    if self._bleu and self.tokenizer is None:
      raise ValueError("task_options.bleu_batches > 0 needs data.tokenizer")
    if self._bleu and not _sacrebleu_available():
      log.warning("task_options.bleu_batches=%d but sacrebleu is not installed: no "
                  "eval_bleu (pip install 'sacrebleu>=2.4')", num)
      self._bleu = False
    tokenize = self.options.bleu_tokenize
    if self._bleu and tokenize is not None:
      known = _sacrebleu_tokenizers()
      if known is not None and tokenize not in known:
        raise ValueError(f"task_options.bleu_tokenize={tokenize!r} is not a sacrebleu "
                         f"tokenizer; known: {sorted(known)}")

  def batches(self, *, batch_size: int, seed: int, train: bool) -> Any:
    data = self.data
    encode = pipeline.EncodeSeq2Seq(self.tokenizer, data.source_len, data.target_len,
                                    data.source_key, data.target_key)
    return pipeline.read(self.source(train), encode, self.read_options(
        batch_size=batch_size, seed=seed, train=train))

  def example_length(self) -> int:
    return self.data.source_len + self.data.target_len

  def model_inputs(self, batch: base.Batch) -> tuple[Any, ...]:
    return batch["inputs"], batch["decoder_inputs"], batch["inputs_mask"]

  def loss(self, model: nn.Module, params: Any, batch: base.Batch,
           rng: jax.Array | None, deterministic: bool
           ) -> tuple[jax.Array, base.Metrics]:
    logits_BTV = self.apply(model, params, batch, rng, deterministic)
    return seq2seq.loss(logits_BTV, batch["targets"], batch["weights"],
                        label_smoothing=self.options.label_smoothing)

  def eval_metrics(self, params: Any, batches: list[base.Batch],
                   metrics: Mapping[str, float],
                   runtime: base.Runtime) -> dict[str, float]:
    if not self._bleu:
      return {}
    max_new_tokens = int(self.data.target_len)
    max_len = getattr(self.model_config, "max_len", None)
    if isinstance(max_len, int):
      max_new_tokens = min(max_new_tokens, max_len)
    score = bleu_of_batches(runtime, params, batches[:self.options.bleu_batches],
                            self.tokenizer, max_new_tokens=max_new_tokens,
                            tokenize=self.options.bleu_tokenize)
    return {"bleu": score}
