"""Tokenizers: round trips (incl. non-ASCII UTF-8), special ids, save/load."""

from __future__ import annotations

import numpy as np
import pytest

from jaxformer.data import special_tokens as st
from jaxformer.data import tokenizers

TEXTS = ["", "hello world", "naïve café — 日本語 🚀", "tab\tnewline\n\x00nul"]


def test_special_ids_defined_once():
  ids = st.SpecialIds.consecutive(10)
  assert ids.all == tuple(range(10, 17))
  assert ids.as_dict() == dict(zip(st.SPECIAL_TOKENS, range(10, 17)))
  assert len(set(st.SPECIAL_TOKENS)) == 7


@pytest.mark.parametrize("text", TEXTS)
def test_byte_round_trip(text):
  tok = tokenizers.ByteTokenizer()
  ids = tok.encode(text)
  assert ids == list(text.encode("utf-8"))
  assert tok.decode(ids) == text
  np.testing.assert_array_equal(tok.encode_array(text), np.asarray(ids, np.int32))
  assert tok.encode_array(text.encode("utf-8")).dtype == np.int32
  assert tok.encode(text.encode("utf-8")) == ids


def test_byte_specials_and_vocab():
  tok = tokenizers.ByteTokenizer()
  assert tok.vocab_size == 263
  assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.unk_id, tok.cls_id, tok.sep_id,
          tok.mask_id) == tuple(range(256, 263))
  ids = [tok.bos_id] + tok.encode("é") + [tok.eos_id]
  assert tok.decode(ids) == "é"
  assert tok.decode(ids, skip_special=False) == "[BOS]é[EOS]"
  # Invalid UTF-8 decodes with replacement characters instead of raising.
  assert tok.decode([0xFF]) == "\ufffd"
  with pytest.raises(ValueError, match="ids must be in"):
    tok.decode([263])
  with pytest.raises(TypeError, match="text must be str or bytes"):
    tok.encode(3)


def test_char_round_trip_and_save_load(tmp_path):
  tok = tokenizers.CharTokenizer.from_corpus(TEXTS)
  assert tok.special_ids == tuple(range(7))
  assert tok.vocab_size == 7 + len(set("".join(TEXTS)))
  for text in TEXTS:
    assert tok.decode(tok.encode(text)) == text
  assert tok.encode("Z") == [tok.unk_id]  # never seen
  assert tok.decode([tok.cls_id, tok.encode("a")[0]], skip_special=False) == "[CLS]a"
  path = tmp_path / "chars.json"
  tok.save(path)
  loaded = tokenizers.CharTokenizer.load(path)
  assert loaded.chars == tok.chars
  assert loaded.encode(TEXTS[2]) == tok.encode(TEXTS[2])
  (tmp_path / "bad.json").write_text('{"type": "bpe"}')
  with pytest.raises(ValueError, match="not a CharTokenizer"):
    tokenizers.CharTokenizer.load(tmp_path / "bad.json")


def test_char_min_count():
  tok = tokenizers.CharTokenizer.from_corpus(["aaab"], min_count=2)
  assert tok.chars == ("a",)
  with pytest.raises(ValueError, match="min_count"):
    tokenizers.CharTokenizer.from_corpus(["a"], min_count=0)


def test_sentencepiece_train_round_trip(tmp_path):
  corpus = [f"the quick brown fox {i} jumps over the lazy dog naïve café"
            for i in range(200)]
  tok = tokenizers.train_sentencepiece(corpus, 60, tmp_path / "sp.model")
  assert tok.vocab_size == 60
  assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id) == (0, 1, 2, 3)
  assert len(set(tok.special_ids)) == 7
  text = "the lazy fox jumps over the café"
  ids = tok.encode(text)
  assert tok.decode(ids) == text
  assert tok.decode([tok.cls_id] + ids, skip_special=False).startswith("[CLS]")
  assert not set(ids) & {tok.pad_id, tok.bos_id, tok.eos_id, tok.cls_id, tok.sep_id,
                         tok.mask_id}
  # The same corpus gives the same model.
  again = tokenizers.train_sentencepiece(corpus, 60, tmp_path / "sp2.model")
  assert again.encode(text) == ids
  reloaded = tokenizers.SentencePieceTokenizer(tmp_path / "sp.model")
  assert reloaded.encode(text) == ids
  with pytest.raises(ValueError, match="does not exist"):
    tokenizers.SentencePieceTokenizer(tmp_path / "missing.model")


def test_decode_rejects_floats_and_out_of_range_ids():
  for tok in (tokenizers.ByteTokenizer(), tokenizers.CharTokenizer("ab")):
    with pytest.raises(TypeError, match="integers"):
      tok.decode([1.0, 2.0])
    with pytest.raises(TypeError, match="integers"):
      tok.decode(np.asarray([0.5]))
    with pytest.raises(ValueError, match=r"in \[0, "):
      tok.decode([tok.vocab_size])
    with pytest.raises(ValueError, match=r"\[-1\]"):
      tok.decode([-1])
    assert tok.decode(np.asarray([], np.int32)) == ""
