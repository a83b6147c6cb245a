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

import collections
import dataclasses
import os
from collections.abc import Iterator, Mapping
from typing import Any

from jaxformer.data import local_text
from jaxformer.data import sources
from jaxformer.data import special_tokens as st
from jaxformer.data import tokenizers as tok_lib

TOKENIZERS = ("bytes", "chars", "sentencepiece")
FILES = {"chars": "chars.json", "sentencepiece": "sentencepiece.model"}
# Records read to fit a vocabulary when the source cannot list its texts.
MAX_FIT_RECORDS = 10_000
# The largest share of characters a character vocabulary may fail to encode.
UNKNOWN_LIMIT = 0.01


def _fields(section: Any) -> Mapping[str, Any]:
  """A ``DataConfig`` (or a plain ``data`` mapping) as a mapping of its fields."""
  if dataclasses.is_dataclass(section):
    return {f.name: getattr(section, f.name) for f in dataclasses.fields(section)}
  return section


def train_texts(section: Any) -> Iterator[bytes | str]:
  """The texts of the train split of ``data.source`` (to fit a vocabulary)."""
  return split_texts(section, _fields(section).get("train_split", "train"))


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


def split_texts(section: Any, split: str) -> Iterator[bytes | str]:
  """The texts of ``split`` of ``data.source`` (all of them, or the first
  :data:`MAX_FIT_RECORDS` records of a source that cannot list its texts)."""
  section = _fields(section)
  source = sources.get_source(section["source"], split,
                              **dict(section.get("source_options") or {}))
  if hasattr(source, "texts"):
    yield from source.texts()
    return
  key = section.get("text_key", "text")
  for i in range(min(len(source), MAX_FIT_RECORDS)):
    yield source[i][key]


def check_coverage(tokenizer: tok_lib.Tokenizer, section: Any,
                   limit: float = UNKNOWN_LIMIT) -> str:
  """How much of the train and validation text a character vocabulary cannot encode.

  Returns a note for the run's header line (``""`` for tokenizers without unknown
  characters: bytes, SentencePiece); raises a ValueError when more than ``limit`` of
  the characters would become the unknown token (a vocabulary fitted on other text).
  """
  if not isinstance(tokenizer, tok_lib.CharTokenizer):
    return ""
  section = _fields(section)
  known = set(tokenizer.chars)
  unknown: collections.Counter[str] = collections.Counter()
  total = 0
  splits = [section.get("train_split", "train"), section.get("eval_split")]
  for split in dict.fromkeys(s for s in splits if s):
    for text in split_texts(section, split):
      if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
      total += len(text)
      for c in set(text) - known:
        unknown[c] += text.count(c)
  count = sum(unknown.values())
  share = count / max(total, 1)
  examples = ", ".join(f"{c!r} x{n}" for c, n in sorted(
      unknown.items(), key=lambda item: (-item[1], item[0]))[:5])
  if share > limit:
    raise ValueError(
        f"{count:,} of {total:,} characters ({share:.2%}) of the train and validation "
        f"text are not in the run's character vocabulary ({examples}), above the "
        f"{limit:.0%} limit: they would all become {st.UNK}. Fit a vocabulary on this "
        "text (another --workdir), or use data.tokenizer='bytes'")
  return (f"{count:,} unknown characters ({share:.3%}: {examples})" if count
          else "no unknown characters")


def check_text(section: Any) -> None:
  """A text tokenizer on local files needs UTF-8 text (or
  ``data.source_options.encoding``): else a
  ValueError naming the file and the byte offset, before anything is fitted or
  trained (the bytes would otherwise become U+FFFD, silently)."""
  section = _fields(section)
  options = dict(section.get("source_options") or {})
  if section.get("source") == "text_files" and not options.get("encoding"):
    local_text.check_utf8(options.get("path") or "")


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
  check_text(section)
  if workdir is None:
    raise ValueError(f"data.tokenizer={kind!r} fits a vocabulary and needs a workdir "
                     "to keep it")
  path = os.path.join(workdir, "tokenizer", FILES[kind])
  if os.path.exists(path):
    return load(kind, path)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  return _fit(kind, section, path)
