"""The tokenizers of Hugging Face checkpoint directories, behind jaxformer's interface.

* GPT-2's byte-level BPE from ``vocab.json`` + ``merges.txt``: every special id is
  ``<|endoftext|>`` (GPT-2 has no other special token; it also pads with it).
* BERT's WordPiece from ``vocab.txt`` (lower-cased and accent-stripped unless
  ``tokenizer_config.json`` says ``do_lower_case: false``): ``[PAD]``, ``[UNK]``,
  ``[CLS]``, ``[SEP]``, ``[MASK]`` as in the vocabulary, ``[CLS]`` doubling as BOS and
  ``[SEP]`` as EOS.

Both are built with the ``tokenizers`` package (Rust, no torch) and encode without
adding special tokens: the data pipelines add their own.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import numpy as np

from jaxformer.data import special_tokens as st
from jaxformer.data.tokenizers import Tokenizer
from jaxformer.pretrained import checkpoint as ckpt_lib

GPT2_FILES = ("vocab.json", "merges.txt")
BERT_FILES = ("vocab.txt",)
ENDOFTEXT = "<|endoftext|>"


class HuggingFaceTokenizer(Tokenizer):
  """A ``tokenizers.Tokenizer`` with jaxformer's ``encode``/``decode``/special ids."""

  def __init__(self, tokenizer, specials: st.SpecialIds, kind: str):
    self._tok = tokenizer
    self.specials = specials
    self.kind = kind

  @property
  def vocab_size(self) -> int:
    return int(self._tok.get_vocab_size(with_added_tokens=True))

  def encode(self, text: str | bytes) -> list[int]:
    if isinstance(text, bytes):
      text = text.decode("utf-8", errors="replace")
    if not isinstance(text, str):
      raise TypeError(f"text must be str or bytes, got {type(text).__name__}.")
    return list(self._tok.encode(text, add_special_tokens=False).ids)

  def encode_array(self, text: str | bytes) -> np.ndarray:
    return np.asarray(self.encode(text), dtype=np.int32)

  def decode(self, ids: Iterable[int], *, skip_special: bool = True) -> str:
    return self._tok.decode(self._check_ids(ids), skip_special_tokens=skip_special)


def gpt2_tokenizer(vocab_json: str, merges_txt: str) -> HuggingFaceTokenizer:
  """GPT-2's byte-level BPE (regex pre-split, no prefix space) from its two files."""
  from tokenizers import Tokenizer as RustTokenizer  # pylint: disable=g-import-not-at-top
  from tokenizers import (  # pylint: disable=g-import-not-at-top
      decoders, models, pre_tokenizers)
  tok = RustTokenizer(models.BPE.from_file(vocab_json, merges_txt))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  eot = tok.token_to_id(ENDOFTEXT)
  if eot is None:
    raise ValueError(f"{vocab_json} has no {ENDOFTEXT} token")
  tok.add_special_tokens([ENDOFTEXT])
  return HuggingFaceTokenizer(tok, st.SpecialIds(*([eot] * len(st.SPECIAL_TOKENS))),
                              "gpt2_bpe")


def wordpiece_tokenizer(vocab_txt: str, *, lowercase: bool = True) -> HuggingFaceTokenizer:
  """BERT's WordPiece (BERT normaliser and pre-tokenizer, ``##`` continuations)."""
  from tokenizers import Tokenizer as RustTokenizer  # pylint: disable=g-import-not-at-top
  from tokenizers import (  # pylint: disable=g-import-not-at-top
      decoders, models, normalizers, pre_tokenizers)
  tok = RustTokenizer(models.WordPiece.from_file(vocab_txt, unk_token=st.UNK))
  tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                              strip_accents=None, lowercase=lowercase)
  tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
  tok.decoder = decoders.WordPiece(prefix="##")
  ids = {}
  for name in ("pad", "unk", "cls", "sep", "mask"):
    token = getattr(st, name.upper())
    ids[name] = tok.token_to_id(token)
    if ids[name] is None:
      raise ValueError(f"{vocab_txt} has no {token} token")
  tok.add_special_tokens([st.PAD, st.UNK, st.CLS, st.SEP, st.MASK])
  specials = st.SpecialIds(bos=ids["cls"], eos=ids["sep"], **ids)
  return HuggingFaceTokenizer(tok, specials, "wordpiece")


def has_tokenizer(directory: str) -> bool:
  """Whether ``directory`` holds GPT-2 BPE or BERT WordPiece vocabulary files."""
  return any(all(os.path.isfile(os.path.join(directory, f)) for f in files)
             for files in (GPT2_FILES, BERT_FILES))


def load_tokenizer(directory: str) -> HuggingFaceTokenizer:
  """The tokenizer of a checkpoint directory (``vocab.json`` + ``merges.txt``, or
  ``vocab.txt``); ValueError when it has neither."""
  path = lambda name: os.path.join(directory, name)  # noqa: E731
  if all(os.path.isfile(path(f)) for f in GPT2_FILES):
    ckpt_lib.read_json(path("vocab.json"), "GPT-2's token -> id vocabulary")
    try:
      return gpt2_tokenizer(path("vocab.json"), path("merges.txt"))
    except Exception as e:  # the Rust tokenizers' own error type
      if isinstance(e, ValueError) and ENDOFTEXT in str(e):
        raise
      raise ValueError(f"{path('merges.txt')} or {path('vocab.json')} do not make a "
                       f"GPT-2 BPE tokenizer: {e}") from e
  if os.path.isfile(path("vocab.txt")):
    lowercase = True
    if os.path.isfile(path("tokenizer_config.json")):
      config = ckpt_lib.read_json(path("tokenizer_config.json"),
                                  "tokenizer_config.json as save_pretrained writes it")
      lowercase = bool(config.get("do_lower_case", True))
    return wordpiece_tokenizer(path("vocab.txt"), lowercase=lowercase)
  raise ValueError(f"{directory!r} has no tokenizer files: expected vocab.json + "
                   "merges.txt (GPT-2 BPE) or vocab.txt (BERT WordPiece)")
