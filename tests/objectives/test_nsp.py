"""NSP pair construction (50/50, layout) and loss."""

from __future__ import annotations

import chex
import jax.numpy as jnp
import numpy as np
import pytest

from jaxformer.objectives import nsp
import objectives_reference as reference  # same directory

CLS, SEP, PAD = 1, 2, 0


def _documents():
  # Segment ids encode (document, segment): 100 * d + 10 * s + k.
  return [[[100 * d + 10 * s + k for k in range(3)] for s in range(n)]
          for d, n in enumerate([4, 1, 3, 5])]


def test_pairs_are_half_next_half_random():
  docs = _documents()
  rng = np.random.default_rng(0)
  labels = []
  for _ in range(4000):
    a, b, label = nsp.sample_pair(docs, rng)
    (da, sa), (db, sb) = divmod(a[0] // 10, 10), divmod(b[0] // 10, 10)
    if label == nsp.IS_NEXT:
      assert (db, sb) == (da, sa + 1)
    else:
      assert db != da
    labels.append(label)
  assert abs(np.mean(labels) - 0.5) < 4 * np.sqrt(0.25 / 4000)


def test_build_pair_layout_and_truncation():
  ex = nsp.build_pair([5, 6, 7], [8, 9], cls_id=CLS, sep_id=SEP, pad_id=PAD, seq_len=10)
  np.testing.assert_array_equal(ex["tokens"], [CLS, 5, 6, 7, SEP, 8, 9, SEP, PAD, PAD])
  np.testing.assert_array_equal(ex["token_types"], [0, 0, 0, 0, 0, 1, 1, 1, 0, 0])
  np.testing.assert_array_equal(ex["inputs_mask"], [1] * 8 + [0, 0])
  ex = nsp.build_pair(list(range(10, 20)), [8, 9], cls_id=CLS, sep_id=SEP, pad_id=PAD,
                      seq_len=8)
  # Longest-first truncation: 3 + 2 + 3 specials = 8.
  assert list(ex["tokens"]) == [CLS, 10, 11, 12, SEP, 8, 9, SEP]
  with pytest.raises(ValueError, match="seq_len"):
    nsp.build_pair([1], [2], cls_id=CLS, sep_id=SEP, pad_id=PAD, seq_len=4)


def test_source_is_deterministic_random_access():
  src = nsp.NSPSource(_documents(), num_examples=10, seq_len=12, cls_id=CLS,
                      sep_id=SEP, pad_id=PAD, seed=3)
  assert len(src) == 10
  for i in range(10):
    a, b = src[i], src[i]
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])
    assert a["tokens"][0] == CLS and a["nsp_label"] in (0, 1)
  with pytest.raises(ValueError, match=">= 2 documents"):
    nsp.NSPSource([[[1], [2]]], num_examples=1, seq_len=8, cls_id=CLS, sep_id=SEP,
                  pad_id=PAD)


def _old_sample_pair(documents, rng):
  """The original O(#segments) sampler, kept as the reference for the indexed one."""
  firsts = [(d, s) for d, doc in enumerate(documents) for s in range(len(doc) - 1)]
  d, s = firsts[int(rng.integers(len(firsts)))]
  a = documents[d][s]
  if rng.random() < 0.5:
    return a, documents[d][s + 1], nsp.IS_NEXT
  others = [i for i, doc in enumerate(documents) if i != d and len(doc)]
  other = documents[others[int(rng.integers(len(others)))]]
  return a, other[int(rng.integers(len(other)))], nsp.NOT_NEXT


def test_indexed_sampler_draws_what_the_scanning_one_drew():
  rng = np.random.default_rng(0)
  for trial in range(20):
    lengths = rng.integers(0, 5, size=int(rng.integers(2, 9)))
    lengths[0] = max(lengths[0], 2)     # a segment with a successor
    lengths[-1] = max(lengths[-1], 1)   # a second non-empty document
    docs = [[[1000 * d + s] for s in range(n)] for d, n in enumerate(lengths)]
    sampler = nsp.PairSampler(docs)
    for seed in range(50):
      want = _old_sample_pair(docs, np.random.default_rng([trial, seed]))
      got = sampler(np.random.default_rng([trial, seed]))
      assert got == want, (lengths, seed, got, want)
      assert nsp.sample_pair(docs, np.random.default_rng([trial, seed])) == want


# (first token of A, first token of B, label) of NSPSource records 0..23, recorded with
# the scanning sampler before the documents were indexed: same seed, same pairs.
_RECORDED = {
    0: [
        (1420, 1430, 0), (1310, 1500, 1), (1430, 1440, 0), (1310, 1500, 1),
        (1310, 1320, 0), (1410, 1100, 1), (1310, 1320, 0), (1420, 1020, 1),
        (1020, 1500, 1), (1020, 1420, 1), (1020, 1030, 0), (1010, 1020, 0),
        (1430, 1100, 1), (1410, 1420, 0), (1400, 1410, 0), (1410, 1420, 0),
        (1010, 1500, 1), (1000, 1320, 1), (1020, 1030, 0), (1300, 1030, 1),
        (1420, 1430, 0), (1420, 1100, 1), (1430, 1440, 0), (1310, 1320, 0),
    ],
    3: [
        (1420, 1430, 0), (1430, 1440, 0), (1420, 1000, 1), (1020, 1030, 0),
        (1000, 1010, 0), (1000, 1100, 1), (1300, 1100, 1), (1310, 1410, 1),
        (1010, 1310, 1), (1300, 1310, 0), (1000, 1010, 0), (1310, 1320, 0),
        (1300, 1020, 1), (1430, 1440, 0), (1400, 1410, 0), (1400, 1410, 0),
        (1430, 1500, 1), (1010, 1100, 1), (1310, 1320, 0), (1410, 1030, 1),
        (1410, 1100, 1), (1420, 1500, 1), (1410, 1000, 1), (1020, 1300, 1),
    ],
}


def test_source_pairs_are_unchanged_for_the_same_seed():
  docs = [[[100 * d + 10 * s + k + 1000 for k in range(3)] for s in range(n)]
          for d, n in enumerate([4, 1, 0, 3, 5, 1])]
  for seed, want in _RECORDED.items():
    src = nsp.NSPSource(docs, num_examples=24, seq_len=12, cls_id=CLS, sep_id=SEP,
                        pad_id=PAD, seed=seed)
    got = []
    for i in range(24):
      ex = src[i]
      b_start = int(np.argmax(ex["token_types"]))
      got.append((int(ex["tokens"][1]), int(ex["tokens"][b_start]),
                  int(ex["nsp_label"])))
    assert got == want, seed


def test_sampler_rejects_corpora_without_pairs():
  with pytest.raises(ValueError, match="second non-empty"):
    nsp.PairSampler([[[1], [2]], [], []])
  with pytest.raises(ValueError, match=">= 2 segments"):
    nsp.PairSampler([[[1]], [[2]]])
  with pytest.raises(ValueError, match="seq_len"):
    nsp.NSPSource(_documents(), num_examples=1, seq_len=4, cls_id=CLS, sep_id=SEP,
                  pad_id=PAD)


class NSPLossTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_matches_numpy(self):
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(9, 2))
    labels = rng.integers(0, 2, size=9)
    loss, metrics = self.variant(nsp.loss)(jnp.asarray(logits, jnp.float32),
                                           jnp.asarray(labels, jnp.int32))
    ce, _, acc, total = reference.cross_entropy(logits, labels)
    np.testing.assert_allclose(loss, ce, rtol=1e-5)
    np.testing.assert_allclose(metrics["accuracy"], acc, rtol=1e-6)
    assert float(metrics["num_examples"]) == total == 9

  def test_bad_shape(self):
    with pytest.raises(ValueError, match="batch, 2"):
      nsp.loss(jnp.zeros((3, 3)), jnp.zeros(3, jnp.int32))
