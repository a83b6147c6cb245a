"""Causal LM loss against a float64 NumPy reference."""

from __future__ import annotations

import math

from absl.testing import parameterized
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxformer.objectives import causal_lm
import objectives_reference as reference  # same directory


class CausalLMLossTest(chex.TestCase, parameterized.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.product(dtype=["float32", "bfloat16"], smoothing=[0.0, 0.1])
  def test_matches_numpy(self, dtype, smoothing):
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 5, 11)) * 3
    targets = rng.integers(0, 11, size=(2, 5))
    weights = (rng.random((2, 5)) > 0.3).astype(np.float32)
    logits_in = jnp.asarray(logits, dtype)
    fn = self.variant(lambda l, t, w: causal_lm.loss(l, t, w, label_smoothing=smoothing))
    loss, metrics = fn(logits_in, jnp.asarray(targets, jnp.int32), jnp.asarray(weights))
    # The reference sees the same (possibly bfloat16-rounded) logits.
    ce, nll, acc, total = reference.cross_entropy(
        np.asarray(logits_in.astype(jnp.float32)), targets, weights, smoothing)
    assert loss.dtype == jnp.float32
    np.testing.assert_allclose(loss, ce, rtol=1e-5)
    np.testing.assert_allclose(metrics["loss"], ce, rtol=1e-5)
    np.testing.assert_allclose(metrics["nll"], nll, rtol=1e-5)
    np.testing.assert_allclose(metrics["accuracy"], acc, rtol=1e-6)
    np.testing.assert_allclose(metrics["num_tokens"], total)
    np.testing.assert_allclose(metrics["bits_per_token"], nll / math.log(2), rtol=1e-5)

  @chex.variants(with_jit=True, without_jit=True)
  def test_zero_weights_and_default_weights(self):
    logits = jnp.zeros((1, 3, 4))
    targets = jnp.zeros((1, 3), jnp.int32)
    loss, metrics = self.variant(causal_lm.loss)(logits, targets, jnp.zeros((1, 3)))
    assert float(loss) == 0.0 and float(metrics["num_tokens"]) == 0.0
    loss, metrics = self.variant(causal_lm.loss)(logits, targets)
    np.testing.assert_allclose(loss, math.log(4), rtol=1e-6)
    assert float(metrics["num_tokens"]) == 3.0

  def test_gradient_ignores_zero_weight_positions(self):
    rng = np.random.default_rng(1)
    logits = jnp.asarray(rng.normal(size=(1, 4, 6)), jnp.float32)
    targets = jnp.asarray([[1, 2, 3, 4]], jnp.int32)
    weights = jnp.asarray([[1, 0, 1, 0]], jnp.float32)
    grad = jax.grad(lambda l: causal_lm.loss(l, targets, weights)[0])(logits)
    np.testing.assert_array_equal(grad[0, 1], 0.0)
    np.testing.assert_array_equal(grad[0, 3], 0.0)
    assert np.abs(grad[0, 0]).sum() > 0

  def test_bad_shapes(self):
    with pytest.raises(ValueError, match="trailing vocabulary axis"):
      causal_lm.loss(jnp.zeros((2, 3, 4)), jnp.zeros((2, 4), jnp.int32))
    with pytest.raises(ValueError, match="weights"):
      causal_lm.loss(jnp.zeros((2, 3, 4)), jnp.zeros((2, 3), jnp.int32),
                     jnp.zeros((2, 1)))
    with pytest.raises(TypeError, match="integer"):
      causal_lm.loss(jnp.zeros((2, 3, 4)), jnp.zeros((2, 3)))
    with pytest.raises(ValueError, match="label_smoothing"):
      causal_lm.loss(jnp.zeros((2, 3, 4)), jnp.zeros((2, 3), jnp.int32),
                     label_smoothing=1.0)
