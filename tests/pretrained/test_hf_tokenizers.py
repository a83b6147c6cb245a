"""The GPT-2 BPE and BERT WordPiece tokenizers of checkpoint directories.

The expected ids are those ``transformers``' own tokenizers gave for the same texts
when the fixtures were made (``reference_tokens.json``).
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

import helpers as h
from jaxformer.data import tokenizers as data_tokenizers
from jaxformer.pretrained.tokenizers import has_tokenizer, load_tokenizer


@pytest.mark.parametrize("name", ["gpt2_lm", "bert_pretraining"])
def test_ids_match_transformers(name):
  tok = load_tokenizer(h.fixture(name))
  assert isinstance(tok, data_tokenizers.Tokenizer)
  with open(os.path.join(h.fixture(name), "reference_tokens.json"), encoding="utf-8") as f:
    want = json.load(f)
  for text, ids in want.items():
    assert tok.encode(text) == ids, text
    np.testing.assert_array_equal(tok.encode_array(text), ids)
    assert tok.encode_array(text).dtype == np.int32
  assert tok.vocab_size == h.hf_config(name)["vocab_size"]


def test_gpt2_bpe_round_trips_and_specials():
  tok = load_tokenizer(h.fixture("gpt2_lm"))
  text = "Hello world! ünïcode\n  spaces"
  assert tok.decode(tok.encode(text)) == text
  eot = tok.eos_id
  assert eot == h.hf_config("gpt2_lm")["eos_token_id"]
  assert tok.bos_id == tok.pad_id == eot
  assert tok.decode(tok.encode("a") + [eot], skip_special=True) == "a"
  assert tok.decode(tok.encode("a") + [eot], skip_special=False) == "a<|endoftext|>"


def test_wordpiece_specials_and_lowercase():
  tok = load_tokenizer(h.fixture("bert_pretraining"))
  vocab = open(os.path.join(h.fixture("bert_pretraining"), "vocab.txt"),
               encoding="utf-8").read().split("\n")
  for attr, token in (("pad_id", "[PAD]"), ("cls_id", "[CLS]"), ("sep_id", "[SEP]"),
                      ("mask_id", "[MASK]"), ("unk_id", "[UNK]")):
    assert getattr(tok, attr) == vocab.index(token)
  assert tok.bos_id == tok.cls_id and tok.eos_id == tok.sep_id
  assert tok.encode("HELLO World") == tok.encode("hello world")
  assert tok.decode(tok.encode("hello world")) == "hello world"
  with pytest.raises(ValueError, match=r"ids must be in \[0,"):
    tok.decode([tok.vocab_size])


def test_directory_without_tokenizer(tmp_path):
  assert not has_tokenizer(h.fixture("vit_model"))
  assert has_tokenizer(h.fixture("gpt2_lm"))
  with pytest.raises(ValueError, match="has no tokenizer files"):
    load_tokenizer(str(tmp_path))
