"""The run's tokenizer from ``config.data``: bytes, or a vocabulary fitted once per run.

``data.tokenizer`` is one of :data:`TOKENIZERS`:

* ``"bytes"``: :class:`~jaxformer.data.tokenizers.ByteTokenizer` (nothing to fit).
* ``"chars"``: a :class:`~jaxformer.data.tokenizers.CharTokenizer` of the characters
  of the train split.
* ``"sentencepiece"``: a SentencePiece model of ``data.vocab_size`` pieces trained on
  the train split's lines.

A fitted vocabulary is written to ``<workdir>/tokenizer/`` the first time and read from
there on every later start, so a resumed run keeps its ids even if the text changed.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator, Mapping
from typing import Any

from jaxformer.data import sources
from jaxformer.data import tokenizers as tok_lib

TOKENIZERS = ("bytes", "chars", "sentencepiece")
FILES = {"chars": "chars.json", "sentencepiece": "sentencepiece.model"}
# Records read to fit a vocabulary when the source cannot list its texts.
MAX_FIT_RECORDS = 10_000


def _fields(section: Any) -> Mapping[str, Any]:
  """A ``DataConfig`` (or a plain ``data`` mapping) as a mapping of its fields."""
  if dataclasses.is_dataclass(section):
    return {f.name: getattr(section, f.name) for f in dataclasses.fields(section)}
  return section


def train_texts(section: Any) -> Iterator[bytes | str]:
  """The texts of the train split of ``data.source`` (to fit a vocabulary)."""
  section = _fields(section)
  source = sources.get_source(section["source"], section.get("train_split", "train"),
                              **dict(section.get("source_options") or {}))
  if hasattr(source, "texts"):
    yield from source.texts()
    return
  key = section.get("text_key", "text")
  for i in range(min(len(source), MAX_FIT_RECORDS)):
    yield source[i][key]


def _lines(texts: Iterator[bytes | str]) -> Iterator[str]:
  # SentencePiece trains on sentences (and skips long ones): one line each.
  for text in texts:
    if isinstance(text, bytes):
      text = text.decode("utf-8", errors="replace")
    yield from (line for line in text.splitlines() if line.strip())


def _fit(kind: str, section: Mapping[str, Any], path: str) -> tok_lib.Tokenizer:
  tmp = f"{path}.tmp{os.getpid()}"
  if kind == "chars":
    tok = tok_lib.CharTokenizer.from_corpus(train_texts(section))
    tok.save(tmp)
  else:
    vocab_size = section.get("vocab_size")
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or (
        vocab_size < 8):
      raise ValueError(f"data.vocab_size={vocab_size!r} must be an int >= 8 for "
                       "data.tokenizer='sentencepiece'")
    try:
      tok_lib.train_sentencepiece(_lines(train_texts(section)), vocab_size, tmp)
    except RuntimeError as e:  # e.g. more pieces than the text has, or fewer chars
      reason = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
      raise ValueError(f"data.vocab_size={vocab_size}: SentencePiece cannot fit that "
                       f"on the train split ({reason})") from None
  os.replace(tmp, path)  # atomic: a killed fit leaves no half-written vocabulary
  return load(kind, path)


def load(kind: str, path: str) -> tok_lib.Tokenizer:
  """The tokenizer of kind ``kind`` saved at ``path``."""
  if kind == "chars":
    return tok_lib.CharTokenizer.load(path)
  return tok_lib.SentencePieceTokenizer(path)


def build_tokenizer(section: Any,
                    workdir: str | None = None) -> tok_lib.Tokenizer | None:
  """The tokenizer ``data.tokenizer`` names (None when absent: image data).

  Args:
    section: ``config.data`` (a ``DataConfig`` or a mapping).
    workdir: where a fitted vocabulary is kept (``<workdir>/tokenizer/``); needed
      for ``"chars"`` and ``"sentencepiece"``.
  """
  section = _fields(section)
  kind = section.get("tokenizer")
  if kind is None:
    return None
  if kind not in TOKENIZERS:
    raise ValueError(f"data.tokenizer={kind!r} is not one of {TOKENIZERS}")
  if kind == "bytes":
    return tok_lib.ByteTokenizer()
  if workdir is None:
    raise ValueError(f"data.tokenizer={kind!r} fits a vocabulary and needs a workdir "
                     "to keep it")
  path = os.path.join(workdir, "tokenizer", FILES[kind])
  if os.path.exists(path):
    return load(kind, path)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  return _fit(kind, section, path)
