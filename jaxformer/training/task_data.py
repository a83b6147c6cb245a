"""Data adapters for the non-LM tasks: NSP documents from text, local labelled lines.

* :func:`segment_documents`: a text source -> documents as lists of token segments,
  the input of :class:`jaxformer.objectives.nsp.NSPSource` (BERT pre-training pairs).
* :class:`LineKindSource`: a small *local* text-classification set (no download) for
  tiny fine-tuning runs: lines of the embedded standard-library source labelled
  ``0`` comment, ``1`` definition (``def``/``class``), ``2`` other code.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from jaxformer.data import embedded
from jaxformer.data import tokenizers as tok_lib

LINE_KINDS = ("comment", "definition", "code")


def _as_bytes(text: Any) -> bytes:
  return text if isinstance(text, bytes) else str(text).encode("utf-8")


def segment_documents(source, tokenizer: tok_lib.Tokenizer, *, separator: str,
                      max_segment_tokens: int, max_documents: int,
                      max_segments: int | None = None,
                      text_key: str = "text") -> list[list[np.ndarray]]:
  """The first ``max_documents`` records of ``source`` cut into token segments.

  Each record's text is split at ``separator`` (e.g. ``"\\n\\n"``: paragraphs /
  code blocks; ``". "``: sentences); empty pieces are dropped and each piece is
  tokenized and cut to ``max_segment_tokens``; a document keeps its first
  ``max_segments`` segments (None: all). Records with no segment are skipped.
  (``NSPSource`` scans every segment for each example it draws, so the total count
  sets its speed: ~0.5 us per segment per example.)

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


def line_kind(line: bytes) -> int | None:
  """The :data:`LINE_KINDS` index of a stripped source line (None if empty)."""
  if not line:
    return None
  if line.startswith(b"#"):
    return 0
  if line.startswith((b"def ", b"class ", b"async def ")):
    return 1
  return 2


class LineKindSource:
  """``{"text": bytes, "label": int}``: standard-library lines by kind (balanced).

  Record ``i`` has label ``i % 3`` and is a line of that kind drawn with
  ``default_rng([seed, i])`` from the embedded ``split`` (leading whitespace removed,
  cut to ``max_bytes``).

  Args:
    split: ``"train"`` or ``"validation"`` (the embedded source's split by file).
    num_examples: records in the source.
    max_files: read only the first files of the split (fast start).
    max_bytes: longest line kept.
    seed: drawing seed.
  """

  def __init__(self, split: str = "train", *, num_examples: int = 30_000,
               max_files: int = 150, max_bytes: int = 120, seed: int = 0):
    if num_examples < 1:
      raise ValueError(f"num_examples={num_examples!r} must be >= 1")
    text = embedded.stdlib_text_source(split)
    lines: list[list[bytes]] = [[] for _ in LINE_KINDS]
    for i in range(min(len(text), max_files)):
      for line in text[i]["text"].splitlines():
        line = line.strip()[:max_bytes]
        kind = line_kind(line)
        if kind is not None:
          lines[kind].append(line)
    if not all(lines):
      raise ValueError(f"LineKindSource: split {split!r} (first {max_files} files) "
                       "lacks a line of some kind")
    self._lines = lines
    self._num_examples = num_examples
    self._seed = seed

  def __len__(self) -> int:
    return self._num_examples

  def __getitem__(self, index: int) -> dict[str, Any]:
    index = int(index)
    if not 0 <= index < self._num_examples:
      raise IndexError(f"index {index} out of range for {self._num_examples} records")
    label = index % len(LINE_KINDS)
    pool = self._lines[label]
    rng = np.random.default_rng([self._seed, index])
    return {"text": pool[int(rng.integers(len(pool)))], "label": np.int64(label)}
