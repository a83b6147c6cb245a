"""NSP pairs from text: segments, pair layout, the 50/50 sampler, the source."""

from __future__ import annotations

import numpy as np
import pytest

from jaxformer.data import nsp_pairs
from jaxformer.data import tokenizers

CLS, SEP, PAD = 1, 2, 0


def _documents():
  # Segment ids encode (document, segment): 100 * d + 10 * s + k.
  return [[[100 * d + 10 * s + k for k in range(3)] for s in range(n)]
          for d, n in enumerate([4, 1, 3, 5])]


def test_pairs_are_half_next_half_random():
  docs = _documents()
  rng = np.random.default_rng(0)
  sampler = nsp_pairs.PairSampler(docs)
  labels = []
  for _ in range(4000):
    a, b, label = sampler(rng)
    (da, sa), (db, sb) = divmod(a[0] // 10, 10), divmod(b[0] // 10, 10)
    if label == nsp_pairs.IS_NEXT:
      assert (db, sb) == (da, sa + 1)
    else:
      assert db != da
    labels.append(label)
  assert abs(np.mean(labels) - 0.5) < 4 * np.sqrt(0.25 / 4000)


def test_build_pair_layout_and_truncation():
  kw = dict(cls_id=CLS, sep_id=SEP, pad_id=PAD)
  ex = nsp_pairs.build_pair([5, 6, 7], [8, 9], seq_len=10, **kw)
  np.testing.assert_array_equal(ex["inputs"], [CLS, 5, 6, 7, SEP, 8, 9, SEP, PAD, PAD])
  np.testing.assert_array_equal(ex["token_types"], [0, 0, 0, 0, 0, 1, 1, 1, 0, 0])
  np.testing.assert_array_equal(ex["inputs_mask"], [1] * 8 + [0, 0])
  ex = nsp_pairs.build_pair(list(range(10, 20)), [8, 9], seq_len=8, **kw)
  # Longest-first truncation: 3 + 2 + 3 specials = 8.
  assert list(ex["inputs"]) == [CLS, 10, 11, 12, SEP, 8, 9, SEP]
  with pytest.raises(ValueError, match="seq_len"):
    nsp_pairs.build_pair([1], [2], seq_len=4, **kw)


def test_source_is_deterministic_random_access():
  src = nsp_pairs.NSPSource(_documents(), num_examples=10, seq_len=12, cls_id=CLS,
                            sep_id=SEP, pad_id=PAD, seed=3)
  assert len(src) == 10
  for i in range(10):
    a, b = src[i], src[i]
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])
    assert a["inputs"][0] == CLS and a["nsp_label"] in (0, 1)
  with pytest.raises(ValueError, match=">= 2 documents"):
    nsp_pairs.NSPSource([[[1], [2]]], num_examples=1, seq_len=8, cls_id=CLS,
                        sep_id=SEP, pad_id=PAD)


def test_sampler_rejects_corpora_without_pairs():
  with pytest.raises(ValueError, match="second non-empty"):
    nsp_pairs.PairSampler([[[1], [2]], [], []])
  with pytest.raises(ValueError, match=">= 2 segments"):
    nsp_pairs.PairSampler([[[1]], [[2]]])
  with pytest.raises(ValueError, match="seq_len"):
    nsp_pairs.NSPSource(_documents(), num_examples=1, seq_len=4, cls_id=CLS,
                        sep_id=SEP, pad_id=PAD)


def test_segment_documents():
  tok = tokenizers.ByteTokenizer()
  source = [{"text": b"a b. c d. e"}, {"text": "f g. "}, {"text": b""}]
  docs = nsp_pairs.segment_documents(source, tok, separator=". ",
                                     max_segment_tokens=2, max_documents=3)
  assert [[tok.decode(s) for s in d] for d in docs] == [["a ", "c ", "e"], ["f "]]
  docs = nsp_pairs.segment_documents(source, tok, separator=". ",
                                     max_segment_tokens=9, max_documents=3,
                                     max_segments=2)
  assert [[tok.decode(s) for s in d] for d in docs] == [["a b", "c d"], ["f g"]]
  with pytest.raises(ValueError, match="NSP needs"):
    nsp_pairs.segment_documents(source, tok, separator=". ", max_segment_tokens=9,
                                max_documents=3, max_segments=1)
