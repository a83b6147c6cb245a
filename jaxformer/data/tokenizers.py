"""Tokenizers: bytes, characters and SentencePiece, behind one small interface.

Every tokenizer has ``encode(text) -> list[int]``, ``encode_array(text) -> int32 array``
(the fast path the pipelines use), ``decode(ids) -> str``, ``vocab_size`` and the ids of
the special tokens of :mod:`jaxformer.data.special_tokens` as attributes (``pad_id``,
``bos_id``, ``eos_id``, ``unk_id``, ``cls_id``, ``sep_id``, ``mask_id``;
``special_ids`` lists them all).

Vocabulary layouts:

* :class:`ByteTokenizer`: ids 0..255 are the bytes of the UTF-8 encoding, ids 256..262
  the specials in the order of ``SPECIAL_TOKENS`` (``[PAD]`` = 256, ``[BOS]`` = 257,
  ``[EOS]`` = 258, ``[UNK]`` = 259, ``[CLS]`` = 260, ``[SEP]`` = 261, ``[MASK]`` = 262);
  ``vocab_size`` = 263. Never produces ``[UNK]``.
* :class:`CharTokenizer`: ids 0..6 the specials, then one id per character seen in the
  corpus it was built from (sorted by code point); unseen characters map to ``[UNK]``.
* :class:`SentencePieceTokenizer`: the ids the model file defines;
  :func:`train_sentencepiece` makes models with ``[PAD]`` = 0, ``[UNK]`` = 1,
  ``[BOS]`` = 2, ``[EOS]`` = 3 and ``[CLS]``, ``[SEP]``, ``[MASK]`` as user symbols.
"""

from __future__ import annotations

import abc
from collections.abc import Iterable, Sequence
import io
import json
import os

import numpy as np

from jaxformer.data import special_tokens as st


def _as_str(text: str | bytes) -> str:
  if isinstance(text, bytes):
    return text.decode("utf-8", errors="replace")
  if isinstance(text, str):
    return text
  raise TypeError(f"text must be str or bytes, got {type(text).__name__}.")


def check_ids(ids: np.ndarray, vocab_size: int, what: str) -> None:
  """ValueError unless every id of ``ids`` is in ``[0, vocab_size)``.

  Out-of-range ids would index past the embedding table (NaN or wrapped rows) inside
  jit, where nothing can be checked: this is the check at the data's edge.
  """
  ids = np.asarray(ids)
  if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
    bad = ids[(ids < 0) | (ids >= vocab_size)].reshape(-1)[:5].tolist()
    raise ValueError(f"{what} must be in [0, {vocab_size}), got {bad}.")


class Tokenizer(abc.ABC):
  """The interface shared by all tokenizers."""

  specials: st.SpecialIds

  @property
  @abc.abstractmethod
  def vocab_size(self) -> int:
    """Number of ids, specials included; every id is in ``[0, vocab_size)``."""

  @abc.abstractmethod
  def encode(self, text: str | bytes) -> list[int]:
    """Token ids of ``text`` (no BOS/EOS added). Bytes are read as UTF-8."""

  @abc.abstractmethod
  def decode(self, ids: Iterable[int], *, skip_special: bool = True) -> str:
    """The text of ``ids``; specials are dropped, or printed as ``[EOS]`` etc."""

  def encode_array(self, text: str | bytes) -> np.ndarray:
    """Like :meth:`encode`, as an int32 array: ``[num_tokens]``."""
    return np.asarray(self.encode(text), dtype=np.int32)

  @property
  def pad_id(self) -> int:
    return self.specials.pad

  @property
  def bos_id(self) -> int:
    return self.specials.bos

  @property
  def eos_id(self) -> int:
    return self.specials.eos

  @property
  def unk_id(self) -> int:
    return self.specials.unk

  @property
  def cls_id(self) -> int:
    return self.specials.cls

  @property
  def sep_id(self) -> int:
    return self.specials.sep

  @property
  def mask_id(self) -> int:
    return self.specials.mask

  @property
  def special_ids(self) -> tuple[int, ...]:
    return self.specials.all

  def _check_ids(self, ids: Iterable[int]) -> list[int]:
    array = np.asarray(ids if isinstance(ids, np.ndarray) else list(ids))
    if array.size and not (np.issubdtype(array.dtype, np.integer)
                           or array.dtype == bool):
      raise TypeError(f"ids must be integers, got dtype {array.dtype} "
                      f"(e.g. {array.reshape(-1)[:3].tolist()}).")
    check_ids(array, self.vocab_size, "ids")
    return [int(i) for i in array.reshape(-1)]


class ByteTokenizer(Tokenizer):
  """UTF-8 bytes as tokens: ids 0..255 are bytes, 256..262 the specials."""

  NUM_BYTES = 256

  def __init__(self):
    self.specials = st.SpecialIds.consecutive(self.NUM_BYTES)
    self._special_strings = {v: k for k, v in self.specials.as_dict().items()}

  @property
  def vocab_size(self) -> int:
    return self.NUM_BYTES + len(st.SPECIAL_TOKENS)

  def encode(self, text: str | bytes) -> list[int]:
    return list(self._to_bytes(text))

  def encode_array(self, text: str | bytes) -> np.ndarray:
    return np.frombuffer(self._to_bytes(text), dtype=np.uint8).astype(np.int32)

  def decode(self, ids: Iterable[int], *, skip_special: bool = True) -> str:
    out, pending = [], bytearray()
    for i in self._check_ids(ids):
      if i < self.NUM_BYTES:
        pending.append(i)
        continue
      if not skip_special:
        out.append(pending.decode("utf-8", errors="replace"))
        pending = bytearray()
        out.append(self._special_strings[i])
    out.append(pending.decode("utf-8", errors="replace"))
    return "".join(out)

  @staticmethod
  def _to_bytes(text: str | bytes) -> bytes:
    if isinstance(text, bytes):
      return text
    if isinstance(text, str):
      return text.encode("utf-8")
    raise TypeError(f"text must be str or bytes, got {type(text).__name__}.")


class CharTokenizer(Tokenizer):
  """One id per character of a fixed alphabet; ids 0..6 are the specials."""

  def __init__(self, chars: Sequence[str]):
    """Args: chars: the alphabet, distinct single characters."""
    chars = list(chars)
    if any(not isinstance(c, str) or len(c) != 1 for c in chars):
      raise ValueError("chars must be single-character strings.")
    if len(set(chars)) != len(chars):
      raise ValueError("chars must be distinct.")
    self.specials = st.SpecialIds.consecutive(0)
    self._special_strings = {v: k for k, v in self.specials.as_dict().items()}
    self.chars = tuple(chars)
    offset = len(st.SPECIAL_TOKENS)
    self._char_to_id = {c: i + offset for i, c in enumerate(self.chars)}

  @classmethod
  def from_corpus(cls, texts: Iterable[str | bytes], *,
                  min_count: int = 1) -> CharTokenizer:
    """The characters of ``texts`` occurring at least ``min_count`` times."""
    if min_count < 1:
      raise ValueError(f"min_count must be >= 1, got {min_count}.")
    counts: dict[str, int] = {}
    for text in texts:
      for c in _as_str(text):
        counts[c] = counts.get(c, 0) + 1
    return cls(sorted(c for c, n in counts.items() if n >= min_count))

  @property
  def vocab_size(self) -> int:
    return len(st.SPECIAL_TOKENS) + len(self.chars)

  def encode(self, text: str | bytes) -> list[int]:
    unk, lookup = self.unk_id, self._char_to_id
    return [lookup.get(c, unk) for c in _as_str(text)]

  def decode(self, ids: Iterable[int], *, skip_special: bool = True) -> str:
    offset, out = len(st.SPECIAL_TOKENS), []
    for i in self._check_ids(ids):
      if i >= offset:
        out.append(self.chars[i - offset])
      elif not skip_special:
        out.append(self._special_strings[i])
    return "".join(out)

  def save(self, path: str | os.PathLike[str]) -> None:
    """Writes the alphabet as JSON: ``{"type": "char", "chars": [...]}``."""
    with open(path, "w", encoding="utf-8") as f:
      json.dump({"type": "char", "chars": list(self.chars)}, f, ensure_ascii=False)

  @classmethod
  def load(cls, path: str | os.PathLike[str]) -> CharTokenizer:
    """Reads a file written by :meth:`save`."""
    with open(path, encoding="utf-8") as f:
      blob = json.load(f)
    if not isinstance(blob, dict) or blob.get("type") != "char":
      raise ValueError(f"{path} is not a CharTokenizer file (want type='char').")
    return cls(blob["chars"])


class SentencePieceTokenizer(Tokenizer):
  """A SentencePiece model; it must define the seven special tokens.

  ``[PAD]``, ``[BOS]``, ``[EOS]`` and ``[UNK]`` are the model's pad/bos/eos/unk ids;
  ``[CLS]``, ``[SEP]`` and ``[MASK]`` must be pieces of the model (user symbols).
  :func:`train_sentencepiece` makes such models.
  """

  def __init__(self, model_file: str | os.PathLike[str]):
    import sentencepiece as spm  # pylint: disable=g-import-not-at-top
    if not os.path.exists(model_file):
      raise ValueError(f"model_file {model_file!r} does not exist.")
    self._sp = spm.SentencePieceProcessor(model_file=os.fspath(model_file))
    ids = {}
    for name, value in (("pad", self._sp.pad_id()), ("bos", self._sp.bos_id()),
                        ("eos", self._sp.eos_id()), ("unk", self._sp.unk_id())):
      if value < 0:
        raise ValueError(f"SentencePiece model {model_file} has no {name} id; train "
                         "it with train_sentencepiece or pad_id/bos_id/eos_id >= 0.")
      ids[name] = value
    for name, piece in (("cls", st.CLS), ("sep", st.SEP), ("mask", st.MASK)):
      value = self._sp.piece_to_id(piece)
      if value == self._sp.unk_id():
        raise ValueError(f"SentencePiece model {model_file} has no piece {piece}; "
                         "add it with user_defined_symbols (see train_sentencepiece).")
      ids[name] = value
    self.specials = st.SpecialIds(**ids)
    self._special_strings = {v: k for k, v in self.specials.as_dict().items()}

  @property
  def vocab_size(self) -> int:
    return int(self._sp.get_piece_size())

  def encode(self, text: str | bytes) -> list[int]:
    return list(self._sp.encode(_as_str(text)))

  def decode(self, ids: Iterable[int], *, skip_special: bool = True) -> str:
    ids = self._check_ids(ids)
    if skip_special:
      special = set(self.special_ids)
      return self._sp.decode([i for i in ids if i not in special])
    out, run = [], []
    for i in ids:
      if i in self._special_strings:
        out.append(self._sp.decode(run))
        run = []
        out.append(self._special_strings[i])
      else:
        run.append(i)
    out.append(self._sp.decode(run))
    return "".join(out)


def train_sentencepiece(texts: Iterable[str | bytes], vocab_size: int,
                        path: str | os.PathLike[str], *,
                        model_type: str = "unigram",
                        character_coverage: float = 1.0,
                        max_sentence_length: int = 1 << 16) -> SentencePieceTokenizer:
  """Trains a SentencePiece model on ``texts`` and writes it to ``path``.

  The model has ``[PAD]`` = 0, ``[UNK]`` = 1, ``[BOS]`` = 2, ``[EOS]`` = 3 and
  ``[CLS]``, ``[SEP]``, ``[MASK]`` as user-defined symbols. Training runs on one thread
  so that the same texts give the same model.

  Args:
    texts: training sentences (one per item); bytes are read as UTF-8.
    vocab_size: number of pieces, specials included.
    path: where to write the ``.model`` file.
    model_type: "unigram", "bpe", "char" or "word".
    character_coverage: fraction of characters the model covers.
    max_sentence_length: longer sentences are skipped by the trainer (bytes).

  Returns:
    A :class:`SentencePieceTokenizer` for the written model.
  """
  import sentencepiece as spm  # pylint: disable=g-import-not-at-top
  valid_types = ("unigram", "bpe", "char", "word")
  if model_type not in valid_types:
    raise ValueError(f"model_type must be one of {valid_types}, got {model_type!r}.")
  if vocab_size < 8:
    raise ValueError(f"vocab_size must be >= 8 (7 specials + 1), got {vocab_size}.")
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=(_as_str(t) for t in texts),
      model_writer=model,
      vocab_size=vocab_size,
      model_type=model_type,
      character_coverage=character_coverage,
      max_sentence_length=max_sentence_length,
      pad_id=0, unk_id=1, bos_id=2, eos_id=3,
      pad_piece=st.PAD, unk_piece=st.UNK, bos_piece=st.BOS, eos_piece=st.EOS,
      user_defined_symbols=[st.CLS, st.SEP, st.MASK],
      num_threads=1,
      minloglevel=2,
  )
  with open(path, "wb") as f:
    f.write(model.getvalue())
  return SentencePieceTokenizer(path)
