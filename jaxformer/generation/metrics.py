"""Evaluation metrics for generative models: log-likelihoods, perplexity, bits per byte, BLEU.

Conventions: log-probabilities are natural-log (nats) and summed in float32; a ``weights``
array marks which targets count (1.0) and which are padding (0.0).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

Array = jax.Array


def token_log_probs(logits_BLV: Array, targets_BL: Array) -> Array:
  """Log-probability of each target token under the model's next-token distribution.

  Args:
    logits_BLV: [batch, length, vocab]; ``logits_BLV[:, i]`` predicts ``targets_BL[:, i]``.
    targets_BL: int [batch, length].
  Returns:
    float32 [batch, length], natural log.
  """
  if logits_BLV.ndim != 3 or targets_BL.shape != logits_BLV.shape[:2]:
    raise ValueError(
        f"logits_BLV must be [batch, length, vocab] and targets_BL [batch, length]; got "
        f"{logits_BLV.shape} and {targets_BL.shape}")
  logp_BLV = jax.nn.log_softmax(logits_BLV.astype(jnp.float32), axis=-1)
  return jnp.take_along_axis(logp_BLV, targets_BL[..., None].astype(jnp.int32),
                             axis=-1)[..., 0]


def sequence_log_probs(logits_BLV: Array, targets_BL: Array,
                       weights_BL: Array | None = None) -> Array:
  """Sum over positions of ``weights * log p(target)``.

  Args:
    logits_BLV: [batch, length, vocab].
    targets_BL: int [batch, length].
    weights_BL: [batch, length] or None (all ones).
  Returns:
    float32 [batch].
  """
  logp_BL = token_log_probs(logits_BLV, targets_BL)
  if weights_BL is None:
    return logp_BL.sum(-1)
  if weights_BL.shape != targets_BL.shape:
    raise ValueError(f"weights_BL shape {weights_BL.shape} != targets_BL shape "
                     f"{targets_BL.shape}")
  return (logp_BL * weights_BL.astype(jnp.float32)).sum(-1)


def perplexity(total_nll: float | Array, num_tokens: float | Array) -> Array:
  """``exp(total_nll / num_tokens)``: perplexity from a summed negative log-likelihood.

  Args:
    total_nll: the summed negative log-likelihood in nats.
    num_tokens: how many tokens it was summed over (> 0).
  Returns:
    float32 scalar.
  """
  return jnp.exp(jnp.asarray(total_nll, jnp.float32) / jnp.asarray(num_tokens, jnp.float32))


def bits_per_byte(total_nll: float | Array, num_bytes: float | Array) -> Array:
  """``total_nll / (num_bytes * ln 2)``: a tokenizer-independent compression rate.

  For a byte-level tokenizer with one token per byte this equals the mean loss in bits;
  for sub-word tokenizers pass the byte length of the UTF-8 text the tokens cover.

  Args:
    total_nll: summed negative log-likelihood in nats over the text.
    num_bytes: the text's length in UTF-8 bytes (> 0).
  Returns:
    float32 scalar.
  """
  return (jnp.asarray(total_nll, jnp.float32)
          / (jnp.asarray(num_bytes, jnp.float32) * jnp.float32(math.log(2.0))))


def bleu(hypotheses: Sequence[str], references: Sequence[str] | Sequence[Sequence[str]],
         **kwargs: Any) -> float:
  """Corpus BLEU (sacrebleu, default 13a tokenisation) on detokenised strings, in [0, 100].

  Args:
    hypotheses: one decoded string per sentence.
    references: one reference string per sentence, or several reference streams (a list
      of lists, each as long as ``hypotheses``).
    **kwargs: passed to ``sacrebleu.corpus_bleu`` (e.g. ``tokenize="intl"``).
  Returns:
    The BLEU score as a Python float.
  """
  try:
    import sacrebleu  # pylint: disable=g-import-not-at-top
  except ImportError as e:  # pragma: no cover - sacrebleu is a test/extra dependency
    raise ImportError("bleu() needs sacrebleu: pip install 'sacrebleu>=2.4'") from e
  hyps = list(hypotheses)
  if isinstance(hypotheses, str) or isinstance(references, str):
    raise TypeError("hypotheses and references must be sequences of strings, not a str")
  if references and isinstance(references[0], str):
    streams = [list(references)]
  else:
    streams = [list(r) for r in references]
  for i, stream in enumerate(streams):
    if len(stream) != len(hyps):
      raise ValueError(f"references stream {i} has {len(stream)} sentences; hypotheses has "
                       f"{len(hyps)}")
  return float(sacrebleu.corpus_bleu(hyps, streams, **kwargs).score)
