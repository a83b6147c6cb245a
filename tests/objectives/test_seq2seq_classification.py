"""Seq2seq (label smoothing, teacher forcing) and classification losses vs NumPy."""

from __future__ import annotations

from absl.testing import parameterized
import chex
import jax.numpy as jnp
import numpy as np
import pytest

from jaxformer.objectives import classification
from jaxformer.objectives import seq2seq
import objectives_reference as reference  # same directory

PAD = 0


class Seq2SeqLossTest(chex.TestCase, parameterized.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(0.0, 0.1, 0.3)
  def test_label_smoothing_matches_numpy(self, eps):
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 6, 9)) * 2
    targets = rng.integers(2, 9, size=(2, 6))
    targets[0, 4:] = PAD
    fn = self.variant(lambda l, t: seq2seq.loss(l, t, pad_id=PAD, label_smoothing=eps))
    loss, metrics = fn(jnp.asarray(logits, jnp.float32), jnp.asarray(targets, jnp.int32))
    weights = (targets != PAD).astype(np.float64)
    ce, nll, acc, total = reference.cross_entropy(logits, targets, weights, eps)
    np.testing.assert_allclose(loss, ce, rtol=1e-5)
    np.testing.assert_allclose(metrics["nll"], nll, rtol=1e-5)
    np.testing.assert_allclose(metrics["accuracy"], acc, rtol=1e-6)
    assert float(metrics["num_tokens"]) == total == 10

  def test_needs_weights_or_pad(self):
    with pytest.raises(ValueError, match="pad_id"):
      seq2seq.loss(jnp.zeros((1, 2, 3)), jnp.zeros((1, 2), jnp.int32))


class ClassificationLossTest(chex.TestCase, parameterized.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(0.0, 0.2)
  def test_matches_numpy(self, eps):
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(8, 5)) * 3
    labels = rng.integers(0, 5, size=8)
    weights = np.array([1, 1, 1, 1, 1, 1, 0, 0], np.float32)
    fn = self.variant(lambda l, y, w: classification.loss(l, y, w, label_smoothing=eps))
    loss, metrics = fn(jnp.asarray(logits, jnp.float32), jnp.asarray(labels, jnp.int32),
                       jnp.asarray(weights))
    ce, nll, acc, total = reference.cross_entropy(logits, labels, weights, eps)
    np.testing.assert_allclose(loss, ce, rtol=1e-5)
    np.testing.assert_allclose(metrics["nll"], nll, rtol=1e-5)
    np.testing.assert_allclose(metrics["accuracy"], acc, rtol=1e-6)
    assert float(metrics["num_examples"]) == total == 6
