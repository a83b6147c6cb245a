"""Embeddings against NumPy float64 references."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import parameterized

from jaxformer.layers import embeddings


def _np_sinusoid(pos, d):
  out = np.zeros(pos.shape + (d,), np.float64)
  for i in range(d // 2):
    angle = pos.astype(np.float64) / 10000.0 ** (2 * i / d)
    out[..., 2 * i] = np.sin(angle)
    out[..., 2 * i + 1] = np.cos(angle)
  return out


class SinusoidalTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_matches_numpy_float64(self):
    pos = np.array([[0, 1, 2, 7], [3, 0, 1, 50]], np.int32)   # packed / decoding positions
    got = self.variant(lambda p: embeddings.sinusoidal_embedding(p, 16))(pos)
    chex.assert_shape(got, (2, 4, 16))
    np.testing.assert_allclose(got, _np_sinusoid(pos, 16), atol=1e-5)

  def test_odd_features(self):
    pos = np.arange(5)[None]
    with self.assertRaisesRegex(ValueError, "features=7"):
      embeddings.sinusoidal_embedding(pos, 7)


class PositionsTest(parameterized.TestCase):

  def test_positions_from_segment_ids(self):
    seg = jnp.array([[1, 1, 1, 2, 2, 0], [1, 2, 2, 2, 3, 3]])
    np.testing.assert_array_equal(embeddings.positions_from_segment_ids(seg),
                                  [[0, 1, 2, 0, 1, 0], [0, 0, 1, 2, 0, 1]])

  def test_default_positions_and_kind_check(self):
    np.testing.assert_array_equal(embeddings.default_positions(jnp.zeros((2, 3))),
                                  [[0, 1, 2], [0, 1, 2]])
    with self.assertRaisesRegex(ValueError, "positions='alibi'"):
      embeddings.check_position_kind("alibi")
    self.assertTrue(callable(embeddings.apply_rotary_embedding))


class TableTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_embed_lookup_and_attend(self):
    module = embeddings.Embed(11, 6, scale_by_sqrt_dim=True)
    ids = jnp.array([[1, 10, 0]])
    variables = module.init(jax.random.key(0), ids)
    table = np.asarray(variables["params"]["embedding"].unbox(), np.float64)
    self.assertEqual(variables["params"]["embedding"].names, ("vocab", "embed"))
    x = self.variant(lambda v, i: module.apply(v, i))(variables, ids)
    np.testing.assert_allclose(x, table[np.array([[1, 10, 0]])] * np.sqrt(6), rtol=1e-6)
    h = np.random.default_rng(0).normal(size=(1, 3, 6)).astype(np.float32)
    logits = self.variant(lambda v, h: module.apply(v, h, method="attend"))(variables, h)
    self.assertEqual(logits.dtype, jnp.float32)
    np.testing.assert_allclose(logits, h @ table.T, rtol=1e-5, atol=1e-6)
    with self.assertRaises(TypeError):
      module.apply(variables, jnp.zeros((1, 2)))

  def test_learned_and_token_type_tables(self):
    for module, names in ((embeddings.LearnedPositionEmbed(5, 4), ("position", "embed")),
                          (embeddings.TokenTypeEmbed(2, 4), (None, "embed"))):
      ids = jnp.array([[1, 0, 1]])
      variables = module.init(jax.random.key(1), ids)
      self.assertEqual(variables["params"]["embedding"].names, names)
      table = variables["params"]["embedding"].unbox()
      np.testing.assert_array_equal(module.apply(variables, ids), table[ids])

  @chex.variants(with_jit=True, without_jit=True)
  def test_patch_embed_equals_strided_conv(self):
    rng = np.random.default_rng(0)
    images = rng.normal(size=(2, 8, 12, 3)).astype(np.float32)
    module = embeddings.PatchEmbed(4, 5)
    variables = module.init(jax.random.key(0), images)
    params = variables["params"]
    kernel = params["kernel"].unbox()
    self.assertEqual(params["kernel"].names, ("patch", "embed"))
    bias = rng.normal(size=(5,)).astype(np.float32)
    variables = {"params": {"kernel": kernel, "bias": bias}}
    got = self.variant(module.apply)(variables, images)
    conv = jax.lax.conv_general_dilated(
        images, kernel.reshape(4, 4, 3, 5), (4, 4), "VALID",
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        precision=jax.lax.Precision.HIGHEST) + bias[None, None, None, :]
    chex.assert_shape(got, (2, 6, 5))
    np.testing.assert_allclose(got, np.asarray(conv).reshape(2, 6, 5), atol=1e-4)
    with self.assertRaisesRegex(ValueError, "patch_size=4"):
      module.apply(variables, images[:, :7])
