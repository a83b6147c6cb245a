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
