"""BERT next-sentence prediction: pair construction (host side, NumPy) and loss.

Labels follow the Hugging Face convention: ``0`` = B is the segment that follows A in
its document ("is next"), ``1`` = B is a random segment of another document. Pairs are
drawn so that both happen with probability 1/2: A is always a segment that has a
successor.

Layout of an example of length ``L``: ``[CLS] A [SEP] B [SEP] [PAD]...``, token types 0
for ``[CLS] A [SEP]`` and 1 for ``B [SEP]`` (0 on padding); the longer of A and B is
truncated (from the end) until everything fits.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from jaxformer.objectives import classification

IS_NEXT = 0
NOT_NEXT = 1


def build_pair(a: Sequence[int], b: Sequence[int], *, cls_id: int, sep_id: int,
               pad_id: int, seq_len: int) -> dict[str, np.ndarray]:
  """``[CLS] A [SEP] B [SEP]`` padded to ``seq_len`` (see the module docstring).

  Returns:
    ``tokens`` int32 ``[L]``, ``token_types`` int32 ``[L]``, ``inputs_mask`` bool
    ``[L]`` (True on real tokens).
  """
  if seq_len < 5:
    raise ValueError(f"seq_len must be >= 5 to hold [CLS] a [SEP] b [SEP], got "
                     f"{seq_len}.")
  a, b = list(a), list(b)
  while len(a) + len(b) + 3 > seq_len:
    if len(a) >= len(b):
      a.pop()
    else:
      b.pop()
  ids = [cls_id, *a, sep_id, *b, sep_id]
  tokens = np.full(seq_len, pad_id, np.int32)
  tokens[:len(ids)] = ids
  token_types = np.zeros(seq_len, np.int32)
  token_types[len(a) + 2:len(ids)] = 1
  mask = np.zeros(seq_len, bool)
  mask[:len(ids)] = True
  return {"tokens": tokens, "token_types": token_types, "inputs_mask": mask}


def sample_pair(documents: Sequence[Sequence[Sequence[int]]],
                rng: np.random.Generator) -> tuple[Sequence[int], Sequence[int], int]:
  """One NSP pair ``(a, b, label)``; label ``IS_NEXT`` with probability 1/2.

  Args:
    documents: documents as lists of segments (token id sequences); at least two
      documents, at least one with two segments.
    rng: NumPy generator.
  """
  firsts = [(d, s) for d, doc in enumerate(documents) for s in range(len(doc) - 1)]
  if len(documents) < 2 or not firsts:
    raise ValueError("documents must hold >= 2 documents and one with >= 2 segments.")
  d, s = firsts[int(rng.integers(len(firsts)))]
  a = documents[d][s]
  if rng.random() < 0.5:
    return a, documents[d][s + 1], IS_NEXT
  others = [i for i, doc in enumerate(documents) if i != d and len(doc)]
  if not others:
    raise ValueError("need a second non-empty document for random segments.")
  other = documents[others[int(rng.integers(len(others)))]]
  return a, other[int(rng.integers(len(other)))], NOT_NEXT


class NSPSource:
  """Random-access NSP examples: record ``i`` is drawn with ``default_rng([seed, i])``.

  Records: ``tokens``, ``token_types``, ``inputs_mask`` (``[seq_len]``) and
  ``nsp_label`` int32; feed them to ``pipeline.example_pipeline`` and mask the tokens
  in the train step with :func:`jaxformer.objectives.masked_lm.mask_tokens`.
  """

  def __init__(self, documents: Sequence[Sequence[Sequence[int]]], *, num_examples: int,
               seq_len: int, cls_id: int, sep_id: int, pad_id: int, seed: int = 0):
    self._documents = documents
    self._num_examples = num_examples
    self._kwargs = dict(cls_id=cls_id, sep_id=sep_id, pad_id=pad_id, seq_len=seq_len)
    self._seed = seed
    sample_pair(documents, np.random.default_rng(0))  # validates documents

  def __len__(self) -> int:
    return self._num_examples

  def __getitem__(self, index: int) -> dict[str, Any]:
    a, b, label = sample_pair(self._documents,
                              np.random.default_rng([self._seed, int(index)]))
    example = build_pair(a, b, **self._kwargs)
    example["nsp_label"] = np.int32(label)
    return example


def loss(logits_B2: jax.Array, labels_B: jax.Array, weights_B: jax.Array | None = None
         ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Binary NSP cross-entropy: ``logits_B2 [batch, 2]``, ``labels_B [batch]``.

  Returns:
    ``(loss, metrics)`` with ``loss``, ``nll``, ``accuracy``, ``num_examples``.
  """
  if logits_B2.ndim != 2 or logits_B2.shape[-1] != 2:
    raise ValueError(f"logits_B2 must be [batch, 2], got {logits_B2.shape}.")
  return classification.loss(logits_B2, labels_B, weights_B)
