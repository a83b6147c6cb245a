"""NSP loss."""

from __future__ import annotations

import chex
import jax.numpy as jnp
import numpy as np
import pytest

from jaxformer.objectives import nsp
import objectives_reference as reference  # same directory


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
