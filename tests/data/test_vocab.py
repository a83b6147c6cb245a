"""The run's tokenizer: bytes, or a chars / SentencePiece vocabulary fitted on the train
split once, saved in the workdir and reused."""

from __future__ import annotations

import os

import pytest

from jaxformer.data import tokenizers
from jaxformer.data import vocab


def _section(tmp_path, kind, **extra):
  text = "".join(f"The {w} fox jumps over the lazy dog {i}.\n"
                 for i, w in enumerate(["quick", "slow", "red", "brown"] * 40))
  (tmp_path / "book.txt").write_text(text + "ZZZ tail only\n")
  return dict(source="text_files", tokenizer=kind, train_split="train",
              source_options=dict(path=str(tmp_path / "book.txt"),
                                  validation_fraction=0.01), **extra)


def test_bytes_and_absent():
  assert isinstance(vocab.build_tokenizer({"tokenizer": "bytes"}),
                    tokenizers.ByteTokenizer)
  assert vocab.build_tokenizer({}) is None
  with pytest.raises(ValueError, match="data.tokenizer='words'"):
    vocab.build_tokenizer({"tokenizer": "words"})
  with pytest.raises(ValueError, match="needs a workdir"):
    vocab.build_tokenizer({"tokenizer": "chars"})


def test_chars_are_fitted_on_the_train_split_saved_and_reused(tmp_path):
  workdir = str(tmp_path / "run")
  tok = vocab.build_tokenizer(_section(tmp_path, "chars"), workdir)
  assert "Z" not in tok.chars          # the validation tail is not fitted
  assert {"T", "q", "\n"} <= set(tok.chars)
  path = os.path.join(workdir, "tokenizer", "chars.json")
  assert os.path.exists(path)
  (tmp_path / "book.txt").write_text("different text: XYZ")
  again = vocab.build_tokenizer(_section(tmp_path, "chars"), workdir)
  assert again.chars == tok.chars      # read back, not refitted


def test_sentencepiece_is_fitted_with_vocab_size(tmp_path):
  workdir = str(tmp_path / "run")
  section = _section(tmp_path, "sentencepiece", vocab_size=60)
  tok = vocab.build_tokenizer(section, workdir)
  assert tok.vocab_size == 60
  assert tok.decode(tok.encode("the lazy dog")) == "the lazy dog"
  assert os.path.exists(os.path.join(workdir, "tokenizer", "sentencepiece.model"))
  assert vocab.build_tokenizer(section, workdir).vocab_size == 60
  with pytest.raises(ValueError, match="data.vocab_size=20: SentencePiece cannot"):
    vocab.build_tokenizer(_section(tmp_path, "sentencepiece", vocab_size=20),
                          str(tmp_path / "c"))
  with pytest.raises(ValueError, match="data.vocab_size=None"):
    vocab.build_tokenizer(_section(tmp_path, "sentencepiece"), str(tmp_path / "b"))
