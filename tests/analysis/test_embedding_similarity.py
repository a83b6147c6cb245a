"""Embedding similarity: cosine similarity and nearest neighbours vs float64 NumPy."""

from __future__ import annotations

from absl.testing import absltest, parameterized
import chex
import jax
import jax.numpy as jnp
import numpy as np

from jaxformer import analysis
from jaxformer.models import GPT, gpt_tiny


def _cosine_reference(a, b):
  a = np.asarray(a, np.float64)
  b = np.asarray(b, np.float64)
  a = a / np.maximum(np.linalg.norm(a, axis=-1, keepdims=True), 1e-8)
  b = b / np.maximum(np.linalg.norm(b, axis=-1, keepdims=True), 1e-8)
  return a @ b.T


class CosineSimilarityTest(parameterized.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_matches_float64_reference(self):
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(5, 16)), rng.normal(size=(7, 16))
    got = self.variant(analysis.cosine_similarity)(jnp.asarray(a), jnp.asarray(b))
    chex.assert_shape(got, (5, 7))
    np.testing.assert_allclose(got, _cosine_reference(a, b), atol=1e-6)

  def test_scale_invariant_and_bounded(self):
    v = jnp.asarray([1.0, 2.0, -3.0])
    np.testing.assert_allclose(analysis.cosine_similarity(v, 5.0 * v), 1.0, atol=1e-6)
    np.testing.assert_allclose(analysis.cosine_similarity(v, -v), -1.0, atol=1e-6)
    zero = jnp.zeros(3)
    self.assertEqual(float(analysis.cosine_similarity(v, zero)), 0.0)

  def test_shape_mismatch_raises(self):
    with self.assertRaisesRegex(ValueError, "same D"):
      analysis.cosine_similarity(jnp.ones((2, 3)), jnp.ones((2, 4)))


class NearestNeighboursTest(parameterized.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_matches_float64_reference(self):
    rng = np.random.default_rng(1)
    table = rng.normal(size=(20, 8))
    queries = np.array([0, 7, 19])
    fn = self.variant(lambda t, q: analysis.nearest_neighbours(t, q, 4))
    ids, sims = fn(jnp.asarray(table), jnp.asarray(queries))
    ref = _cosine_reference(table[queries], table)
    ref[np.arange(3), queries] = -np.inf
    ref_ids = np.argsort(-ref, axis=1)[:, :4]
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_allclose(sims, np.take_along_axis(ref, ref_ids, 1), atol=1e-6)

  def test_finds_planted_neighbour(self):
    table = np.random.default_rng(2).normal(size=(10, 6))
    table[3] = 2.5 * table[8] + 1e-3   # row 3 points where row 8 does
    ids, sims = analysis.nearest_neighbours(jnp.asarray(table), jnp.asarray([8]), 1)
    self.assertEqual(int(ids[0, 0]), 3)
    self.assertGreater(float(sims[0, 0]), 0.999)

  def test_keeps_self_when_asked(self):
    table = jnp.asarray(np.random.default_rng(3).normal(size=(6, 4)))
    ids, sims = analysis.nearest_neighbours(table, jnp.asarray([2]), 1,
                                            exclude_self=False)
    self.assertEqual(int(ids[0, 0]), 2)
    np.testing.assert_allclose(sims[0, 0], 1.0, atol=1e-6)

  @parameterized.parameters(0, 6, 2.0, True)
  def test_bad_k_raises(self, k):
    with self.assertRaisesRegex(ValueError, "k="):
      analysis.nearest_neighbours(jnp.ones((6, 4)), jnp.asarray([0]), k)

  def test_bad_ids_raise(self):
    with self.assertRaisesRegex(ValueError, r"query_ids must be in \[0, 6\)"):
      analysis.nearest_neighbours(jnp.ones((6, 4)), jnp.asarray([6]), 2)
    with self.assertRaisesRegex(TypeError, "int"):
      analysis.nearest_neighbours(jnp.ones((6, 4)), jnp.asarray([0.5]), 2)


class EmbeddingTableTest(absltest.TestCase):

  def test_finds_gpt_token_table(self):
    model = GPT(gpt_tiny())
    params = model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
    table = analysis.embedding_table(params)
    unboxed = jax.tree.map(lambda x: x, params, is_leaf=lambda x: hasattr(x, "unbox"))
    expected = unboxed["token_embedding"]["embedding"]
    expected = expected.unbox() if hasattr(expected, "unbox") else expected
    np.testing.assert_array_equal(table, expected)

  def test_finds_nested_table_and_names_missing(self):
    params = {"encoder": {"token_embedding": {"embedding": jnp.ones((3, 2))}}}
    chex.assert_shape(analysis.embedding_table(params), (3, 2))
    with self.assertRaisesRegex(KeyError, "no 'word/embedding'"):
      analysis.embedding_table(params, name="word")


if __name__ == "__main__":
  absltest.main()
