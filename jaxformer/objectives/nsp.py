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


class PairSampler:
  """Draws NSP pairs in O(1) from an index of the documents built once.

  ``sampler(rng)`` returns what :func:`sample_pair` returns for the same ``rng`` state
  (the same draws in the same order): a first segment uniformly over all segments that
  have a successor, then with probability 1/2 its successor (``IS_NEXT``), else a
  uniform segment of a uniform other non-empty document (``NOT_NEXT``).

  Args:
    documents: documents as lists of segments (token id sequences); at least two
      documents, at least one with two segments. Not copied: don't mutate it while the
      sampler is in use.
  Raises:
    ValueError: fewer than two non-empty documents, or no document with two segments.
  """

  def __init__(self, documents: Sequence[Sequence[Sequence[int]]]):
    lengths = np.asarray([len(doc) for doc in documents], np.int64)
    successors = np.maximum(lengths - 1, 0)
    if len(documents) < 2 or not successors.sum():
      raise ValueError("documents must hold >= 2 documents and one with >= 2 segments.")
    if np.count_nonzero(lengths) < 2:
      raise ValueError("need a second non-empty document for random segments.")
    # (document, segment) of every segment with a successor, document-major.
    self._first_doc = np.repeat(np.arange(len(documents)), successors)
    starts = np.cumsum(successors) - successors
    self._first_seg = np.arange(len(self._first_doc)) - np.repeat(starts, successors)
    self._nonempty = np.flatnonzero(lengths > 0)
    # Rank of each document among the non-empty ones (to skip it in O(1)).
    self._rank = np.cumsum(lengths > 0) - 1
    self._documents = documents

  def __call__(self, rng: np.random.Generator
               ) -> tuple[Sequence[int], Sequence[int], int]:
    docs = self._documents
    j = int(rng.integers(len(self._first_doc)))
    d, s = int(self._first_doc[j]), int(self._first_seg[j])
    a = docs[d][s]
    if rng.random() < 0.5:
      return a, docs[d][s + 1], IS_NEXT
    # The other non-empty documents (d is non-empty: it has >= 2 segments).
    k = int(rng.integers(len(self._nonempty) - 1))
    other = docs[int(self._nonempty[k if k < self._rank[d] else k + 1])]
    return a, other[int(rng.integers(len(other)))], NOT_NEXT


def sample_pair(documents: Sequence[Sequence[Sequence[int]]],
                rng: np.random.Generator) -> tuple[Sequence[int], Sequence[int], int]:
  """One NSP pair ``(a, b, label)``; label ``IS_NEXT`` with probability 1/2.

  Indexes ``documents`` on every call (O(number of documents)); to draw many pairs
  build a :class:`PairSampler` once.

  Args:
    documents: documents as lists of segments (token id sequences); at least two
      documents, at least one with two segments.
    rng: NumPy generator.
  """
  return PairSampler(documents)(rng)


class NSPSource:
  """Random-access NSP examples: record ``i`` is drawn with ``default_rng([seed, i])``.

  Records: ``tokens``, ``token_types``, ``inputs_mask`` (``[seq_len]``) and
  ``nsp_label`` int32; feed them to ``pipeline.example_pipeline`` and mask the tokens
  in the train step with :func:`jaxformer.objectives.masked_lm.mask_tokens`. The
  documents are indexed once (:class:`PairSampler`), so a record costs O(its length),
  independent of the number of documents and segments.
  """

  def __init__(self, documents: Sequence[Sequence[Sequence[int]]], *, num_examples: int,
               seq_len: int, cls_id: int, sep_id: int, pad_id: int, seed: int = 0):
    self._sampler = PairSampler(documents)  # validates documents
    self._num_examples = num_examples
    self._kwargs = dict(cls_id=cls_id, sep_id=sep_id, pad_id=pad_id, seq_len=seq_len)
    self._seed = seed
    if seq_len < 5:
      raise ValueError(f"seq_len must be >= 5 to hold [CLS] a [SEP] b [SEP], got "
                       f"{seq_len}.")

  def __len__(self) -> int:
    return self._num_examples

  def __getitem__(self, index: int) -> dict[str, Any]:
    a, b, label = self._sampler(np.random.default_rng([self._seed, int(index)]))
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
