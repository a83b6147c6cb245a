"""Next-sentence-prediction pairs from text: documents -> segments -> pairs (host, NumPy).

The whole NSP data path: :func:`segment_documents` cuts a text source into documents of
token segments, :class:`NSPSource` draws pairs from them as random-access records with
the masked-LM task's feature names, and ``pipeline.example_pipeline`` batches them.

Labels follow the Hugging Face convention (``IS_NEXT`` = 0: B follows A in its
document; ``NOT_NEXT`` = 1: B is a random segment of another
document), each with probability 1/2; A is always a segment that has a successor.
An example of length ``L`` is ``[CLS] A [SEP] B [SEP] [PAD]...``, token types 0 for
``[CLS] A [SEP]`` and 1 for ``B [SEP]`` (0 on padding); the longer of A and B is cut
(from the end) until everything fits.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from jaxformer.data import tokenizers as tok_lib

IS_NEXT = 0      # B follows A in its document
NOT_NEXT = 1     # B is a random segment of another document


def _as_bytes(text: Any) -> bytes:
  return text if isinstance(text, bytes) else str(text).encode("utf-8")


def segment_documents(source, tokenizer: tok_lib.Tokenizer, *, separator: str,
                      max_segment_tokens: int, max_documents: int,
                      max_segments: int | None = None,
                      text_key: str = "text") -> list[list[np.ndarray]]:
  """The first ``max_documents`` records of ``source`` cut into token segments.

  Each record's text is split at ``separator`` (``"\\n\\n"``: paragraphs / code
  blocks; ``". "``: sentences); empty pieces are dropped, each piece is tokenized and
  cut to ``max_segment_tokens``; a document keeps its first ``max_segments`` segments
  (None: all). Records with no segment are skipped.

  Returns:
    ``documents[d][s]``: int32 token ids of segment ``s`` of document ``d``.
  """
  if max_segment_tokens < 1 or max_documents < 2:
    raise ValueError(f"max_segment_tokens={max_segment_tokens} must be >= 1 and "
                     f"max_documents={max_documents} >= 2")
  sep = separator.encode("utf-8")
  documents = []
  for i in range(min(len(source), max_documents)):
    pieces = [p.strip() for p in _as_bytes(source[i][text_key]).split(sep)]
    segments = [tokenizer.encode_array(p)[:max_segment_tokens]
                for p in pieces if p][:max_segments]
    if segments:
      documents.append(segments)
  if len(documents) < 2 or not any(len(d) >= 2 for d in documents):
    raise ValueError(f"segment_documents: the source gives {len(documents)} documents "
                     f"with separator={separator!r}; NSP needs >= 2, one of them with "
                     ">= 2 segments")
  return documents


def build_pair(a: Sequence[int], b: Sequence[int], *, cls_id: int, sep_id: int,
               pad_id: int, seq_len: int) -> dict[str, np.ndarray]:
  """``[CLS] A [SEP] B [SEP]`` padded to ``seq_len`` (see the module docstring).

  Returns:
    ``inputs`` int32 ``[L]``, ``token_types`` int32 ``[L]``, ``inputs_mask`` bool
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
  return {"inputs": tokens, "token_types": token_types, "inputs_mask": mask}


class PairSampler:
  """Draws NSP pairs ``(a, b, label)`` in O(1) from an index of the documents.

  A first segment uniformly over all segments that have a successor, then with
  probability 1/2 its successor (``IS_NEXT``), else a uniform segment of a uniform
  other non-empty document (``NOT_NEXT``).

  Args:
    documents: documents as lists of segments (token id sequences); at least two
      non-empty documents, one with two segments. Not copied.
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
    k = int(rng.integers(len(self._nonempty) - 1))
    other = docs[int(self._nonempty[k if k < self._rank[d] else k + 1])]
    return a, other[int(rng.integers(len(other)))], NOT_NEXT


class NSPSource:
  """Random-access NSP examples: record ``i`` is drawn with ``default_rng([seed, i])``.

  Records: ``inputs``, ``token_types``, ``inputs_mask`` ``[seq_len]`` and
  ``nsp_label`` int32 (the masked-LM task's features; it masks ``inputs`` in the
  step). A record costs O(its length), whatever the number of documents.
  """

  def __init__(self, documents: Sequence[Sequence[Sequence[int]]], *, num_examples: int,
               seq_len: int, cls_id: int, sep_id: int, pad_id: int, seed: int = 0):
    self._sampler = PairSampler(documents)  # validates documents
    if seq_len < 5:
      raise ValueError(f"seq_len must be >= 5 to hold [CLS] a [SEP] b [SEP], got "
                       f"{seq_len}.")
    self._num_examples = num_examples
    self._kwargs = dict(cls_id=cls_id, sep_id=sep_id, pad_id=pad_id, seq_len=seq_len)
    self._seed = seed

  def __len__(self) -> int:
    return self._num_examples

  def __getitem__(self, index: int) -> dict[str, Any]:
    a, b, label = self._sampler(np.random.default_rng([self._seed, int(index)]))
    example = build_pair(a, b, **self._kwargs)
    example["nsp_label"] = np.int32(label)
    return example
