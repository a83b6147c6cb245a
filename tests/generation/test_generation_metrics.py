"""Log-likelihood, perplexity, bits-per-byte and BLEU helpers."""

from __future__ import annotations

import math

import chex
import jax.numpy as jnp
import numpy as np
from absl.testing import parameterized

from jaxformer.generation import metrics


def _log_softmax64(x):
  x = np.asarray(x, np.float64)
  m = x.max(-1, keepdims=True)
  return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


class LogProbTest(chex.TestCase, parameterized.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_token_and_sequence_log_probs(self):
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 5, 7)).astype(np.float32)
    targets = rng.integers(0, 7, size=(3, 5)).astype(np.int32)
    weights = (rng.uniform(size=(3, 5)) > 0.3).astype(np.float32)
    ref = np.take_along_axis(_log_softmax64(logits), targets[..., None], -1)[..., 0]
    out = self.variant(metrics.token_log_probs)(logits, targets)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
    seq = self.variant(metrics.sequence_log_probs)(logits, targets, weights)
    np.testing.assert_allclose(seq, (ref * weights).sum(-1), rtol=1e-5, atol=1e-5)
    seq_all = self.variant(metrics.sequence_log_probs)(logits, targets)
    np.testing.assert_allclose(seq_all, ref.sum(-1), rtol=1e-5, atol=1e-5)

  def test_shape_errors(self):
    with self.assertRaisesRegex(ValueError, "logits_BLV"):
      metrics.token_log_probs(jnp.zeros((2, 3)), jnp.zeros((2, 3), jnp.int32))
    with self.assertRaisesRegex(ValueError, "weights_BL"):
      metrics.sequence_log_probs(jnp.zeros((2, 3, 4)), jnp.zeros((2, 3), jnp.int32),
                                 jnp.zeros((2, 4)))

  @chex.variants(with_jit=True, without_jit=True)
  def test_perplexity_and_bits_per_byte(self):
    # A uniform model over 256 bytes: ppl 256, 8 bits per byte.
    nll = 100 * math.log(256.0)
    np.testing.assert_allclose(self.variant(metrics.perplexity)(nll, 100), 256.0, rtol=1e-5)
    np.testing.assert_allclose(self.variant(metrics.bits_per_byte)(nll, 100), 8.0, rtol=1e-6)
    # Sub-word tokens: 50 tokens covering 200 bytes.
    np.testing.assert_allclose(metrics.bits_per_byte(50 * 2.0, 200),
                               100 / (200 * math.log(2)), rtol=1e-6)


class BleuTest(parameterized.TestCase):

  def test_identical_is_100(self):
    self.assertAlmostEqual(metrics.bleu(["a b c d e", "the cat"], ["a b c d e", "the cat"]),
                           100.0, places=4)

  def test_known_pair(self):
    # Precisions 5/6, 3/5, 2/4, 1/3, equal lengths (brevity penalty 1).
    hyp, ref = "the cat sat on the mat", "the cat sat on a mat"
    expected = 100 * (5 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25
    self.assertAlmostEqual(metrics.bleu([hyp], [ref]), expected, places=3)

  def test_brevity_penalty(self):
    hyp, ref = "a b c d", "a b c d e f"
    # All n-gram precisions are 1; BP = exp(1 - 6/4).
    self.assertAlmostEqual(metrics.bleu([hyp], [ref]), 100 * math.exp(1 - 6 / 4), places=3)

  def test_multiple_reference_streams(self):
    score = metrics.bleu(["a b c d e"], [["x y z w v"], ["a b c d e"]])
    self.assertAlmostEqual(score, 100.0, places=4)

  def test_mismatched_lengths(self):
    with self.assertRaisesRegex(ValueError, "references"):
      metrics.bleu(["a", "b"], ["a"])
    with self.assertRaisesRegex(TypeError, "str"):
      metrics.bleu("a b", ["a b"])
