"""BLEU at eval time for seq2seq runs: greedy decoding of eval batches, sacrebleu.

:func:`make_bleu_eval` is the ``seq2seq`` task's *extra eval* (see
:data:`jaxformer.training.tasks.EXTRA_EVALS`): the loop's evaluator calls it with the
host batches it has just scored for the teacher-forced metrics, and its result is
logged with the other eval metrics (``bleu`` -> ``eval_bleu`` in ``metrics.jsonl``,
the eval line and ``summary.json``).

What is scored: the first ``train.bleu_batches`` eval batches (at most
``train.eval_batches``); each source is decoded greedily with
:func:`jaxformer.generation.seq2seq.generate_seq2seq` (KV cache sized for
``data.target_len`` tokens, capped by ``model.max_len``), cut at the first ``EOS`` and
detokenized with the run's tokenizer (special tokens dropped); the reference is the
batch's ``targets`` row treated the same way, i.e. the target as the pipeline sees it
(truncated to ``target_len - 1`` tokens). Corpus BLEU (sacrebleu) of all decoded rows,
in [0, 100], with sacrebleu's tokenisation ``train.bleu_tokenize`` (default ``"13a"``,
words; ``"char"`` for data without spaces, such as the synthetic reversal strings, where
every sentence is one "word" and word 4-grams never occur).

Multi-process: the batches are the processes' shards of one global batch, decoded as
one SPMD program; the decoded tokens and the targets are all-gathered, so every
process computes the same BLEU over the whole global batch (only process 0 logs it).

sacrebleu is an optional dependency: without it :func:`make_bleu_eval` logs a warning
once and returns None (no ``eval_bleu``).
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from jaxformer import axes
from jaxformer.generation import metrics as gen_metrics
from jaxformer.generation import seq2seq as seq2seq_gen
from jaxformer.training import sharding as sharding_lib
from jaxformer.training.steps import ExtraEval

log = logging.getLogger(__name__)

HostBatch = Mapping[str, np.ndarray]


def _gather(x: Any) -> np.ndarray:
  """A (possibly multi-process) global array -> its whole value as numpy."""
  if jax.process_count() > 1:
    x = multihost_utils.process_allgather(x, tiled=True)
  return np.asarray(jax.device_get(x))


def ids_to_text(ids: Sequence[int], tokenizer: Any) -> str:
  """Token ids -> text: cut before the first ``EOS``, special tokens dropped."""
  ids = [int(i) for i in ids]
  if tokenizer.eos_id in ids:
    ids = ids[:ids.index(tokenizer.eos_id)]
  return tokenizer.decode(ids)


def decode_batch(model: nn.Module, params: Any, batch: HostBatch, tokenizer: Any, *,
                 max_new_tokens: int, mesh: Mesh,
                 rules: axes.Rules) -> tuple[list[str], list[str]]:
  """Greedy translations and references of one host batch of the seq2seq pipeline.

  Args:
    model: an ``EncoderDecoder`` (training mode).
    params: its parameters (sharded as in training).
    batch: this process's rows: ``inputs``/``inputs_mask`` ``[b, Ls]``, ``targets``
      ``[b, Lt]``; rows whose ``weights`` are all zero (padding) are left out.
    tokenizer: the run's tokenizer (``bos_id``, ``eos_id``, ``pad_id``, ``decode``).
    max_new_tokens: decoding steps after ``BOS`` (the cache holds this many tokens).
    mesh: the training mesh (the batch is sharded over its batch axes).
    rules: the logical-axis rules.
  Returns:
    ``(hypotheses, references)`` of the whole global batch, as strings.
  """
  keys = ("inputs", "inputs_mask", "targets", "weights")
  global_batch = sharding_lib.shard_batch(
      {k: np.asarray(batch[k]) for k in keys if k in batch}, mesh)
  with sharding_lib.activate(mesh, rules):
    tokens_BT, _ = seq2seq_gen.generate_seq2seq(
        model, params, global_batch["inputs"], source_mask=global_batch["inputs_mask"],
        max_new_tokens=max_new_tokens, bos_id=tokenizer.bos_id,
        eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id, temperature=0.0)
  tokens_BT = _gather(tokens_BT)
  targets_BT = _gather(global_batch["targets"])
  if "weights" in global_batch:
    real_B = _gather(global_batch["weights"]).sum(axis=-1) > 0
  else:
    real_B = np.ones(targets_BT.shape[0], bool)
  hyps = [ids_to_text(row[1:], tokenizer) for row in tokens_BT[real_B]]
  refs = [ids_to_text(row, tokenizer) for row in targets_BT[real_B]]
  return hyps, refs


def bleu_of_batches(model: nn.Module, params: Any, batches: Sequence[HostBatch],
                    tokenizer: Any, *, max_new_tokens: int, mesh: Mesh,
                    rules: axes.Rules, tokenize: str | None = None) -> float:
  """Corpus BLEU (0..100) of greedy translations of ``batches`` (see the module doc).

  Args:
    model, params, tokenizer, max_new_tokens, mesh, rules: see :func:`decode_batch`.
    batches: host batches of the seq2seq pipeline.
    tokenize: sacrebleu's tokenisation (None: its default, ``"13a"``).
  """
  hyps: list[str] = []
  refs: list[str] = []
  for batch in batches:
    h, r = decode_batch(model, params, batch, tokenizer, max_new_tokens=max_new_tokens,
                        mesh=mesh, rules=rules)
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


def make_bleu_eval(config: Mapping[str, Any], *, model: nn.Module, tokenizer: Any,
                   mesh: Mesh, rules: axes.Rules) -> ExtraEval | None:
  """The seq2seq extra eval: ``(params, batches) -> {"bleu": float}``, or None.

  None when ``train.bleu_batches`` is 0 or absent, or when sacrebleu is missing (then
  a warning is logged, once per run).

  Args:
    config: the run's config (``train.bleu_batches``, ``train.bleu_tokenize``,
      ``data.target_len``).
    model: the ``EncoderDecoder`` being trained.
    tokenizer: the run's tokenizer.
    mesh: the training mesh.
    rules: the logical-axis rules.
  """
  num = config["train"].get("bleu_batches", 0) or 0
  if isinstance(num, bool) or not isinstance(num, int) or num < 0:
    raise ValueError(f"train.bleu_batches={num!r} must be an int >= 0 (0 = no BLEU)")
  if num == 0:
    return None
  if tokenizer is None:
    raise ValueError("train.bleu_batches > 0 needs data.tokenizer (to detokenize)")
  if not _sacrebleu_available():
    log.warning("train.bleu_batches=%d but sacrebleu is not installed: no eval_bleu "
                "(pip install 'sacrebleu>=2.4')", num)
    return None
  tokenize = config["train"].get("bleu_tokenize")
  known = _sacrebleu_tokenizers()
  if tokenize is not None and known is not None and tokenize not in known:
    raise ValueError(f"train.bleu_tokenize={tokenize!r} is not a sacrebleu tokenizer; "
                     f"known: {sorted(known)}")
  max_new_tokens = int(config["data"]["target_len"])
  max_len = getattr(getattr(model, "config", None), "max_len", None)
  if isinstance(max_len, int):
    max_new_tokens = min(max_new_tokens, max_len)

  def bleu_eval(params: Any, batches: Sequence[HostBatch]) -> dict[str, float]:
    score = bleu_of_batches(model, params, list(batches)[:num], tokenizer,
                            max_new_tokens=max_new_tokens, mesh=mesh, rules=rules,
                            tokenize=tokenize)
    return {"bleu": score}

  return bleu_eval
