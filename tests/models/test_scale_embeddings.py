"""``scale_embeddings``: one option for every model that adds positions to its inputs.

The Transformer's convention (token table at stddev ``d**-0.5``, looked up times
``sqrt(d)``) is on by default exactly where sinusoidal positions are used (the
encoder-decoder keeps the paper's default: on); checked against a float64 NumPy
reference.
"""

from __future__ import annotations

import math

from absl.testing import parameterized
import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxformer import models
from jaxformer.models import common

_rng = np.random.default_rng(0)
_IDS = jnp.asarray(_rng.integers(0, 64, (2, 8)), jnp.int32)

# name -> preset of a model with additive positions.
_PRESETS = {
    "gpt": models.gpt_tiny,
    "bert": models.bert_tiny,
    "vit": models.vit_tiny,
    "image_gpt": models.image_gpt_tiny,
    "encoder_decoder": models.transformer_tiny,
}


def _sinusoids(length: int, d: int) -> np.ndarray:
  """``[length, d]``: sin/cos interleaved, timescale 10000 (float64)."""
  pos = np.arange(length, dtype=np.float64)[:, None]
  inv = 1.0 / 10_000.0 ** (np.arange(0, d, 2, dtype=np.float64) / d)
  return np.stack([np.sin(pos * inv), np.cos(pos * inv)], -1).reshape(length, d)


class DefaultTest(parameterized.TestCase):

  @parameterized.parameters(*_PRESETS)
  def test_on_by_default_with_sinusoids_only(self, name):
    preset = _PRESETS[name]
    self.assertTrue(common.embeddings_scaled(preset(positions="sinusoidal")))
    self.assertIsNone(preset(positions="sinusoidal").scale_embeddings
                      if name != "encoder_decoder" else None)
    learned = preset(positions="learned")
    # The encoder-decoder scales whatever its positions (the paper's default).
    self.assertEqual(common.embeddings_scaled(learned), name == "encoder_decoder")
    self.assertFalse(common.embeddings_scaled(preset(positions="sinusoidal",
                                                     scale_embeddings=False)))
    self.assertTrue(common.embeddings_scaled(preset(positions="learned",
                                                    scale_embeddings=True)))

  @parameterized.parameters(*_PRESETS)
  def test_bad_value_names_the_field(self, name):
    with self.assertRaisesRegex(TypeError, r"scale_embeddings='yes'.*None.*bool"):
      _PRESETS[name](scale_embeddings="yes")

  def test_nyu_classifier_preset_scales(self):
    self.assertTrue(common.embeddings_scaled(models.nyu_imdb_classifier()))

  def test_config_section_and_image_gpt_pass_it_on(self):
    cfg, _ = models.build_model(models.preset_dict("gpt_tiny", positions="sinusoidal",
                                                   scale_embeddings=False))
    self.assertFalse(common.embeddings_scaled(cfg))
    igpt = models.image_gpt_tiny(positions="sinusoidal")
    self.assertTrue(common.embeddings_scaled(igpt.gpt_config()))


class NumericsTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_gpt_embeddings_against_float64(self):
    """No layers, post-LN (no final norm), tied head: logits = (E[ids] * s + P) E^T,
    with s = sqrt(d) and the table at stddev d**-0.5 when scaled, s = 1 and 0.02 not."""
    for scale in (None, False):
      cfg = models.gpt_tiny(num_layers=0, positions="sinusoidal", norm="post",
                            vocab_pad_multiple=1, scale_embeddings=scale)
      model = models.GPT(cfg)
      params = nn.unbox(model.init(jax.random.key(0), _IDS))["params"]
      table = np.asarray(params["token_embedding"]["embedding"], np.float64)
      d = cfg.embed_dim
      want_std = d ** -0.5 if scale is None else 0.02
      self.assertAlmostEqual(float(table.std()), want_std, delta=0.15 * want_std)
      s = math.sqrt(d) if scale is None else 1.0
      x = table[np.asarray(_IDS)] * s + _sinusoids(_IDS.shape[1], d)[None]
      want = x @ table.T
      got = self.variant(model.apply)({"params": params}, _IDS)
      np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
      # Scaled, the tokens are at the sinusoids' scale (RMS ~1 vs 0.71), not 0.02.
      rms = float(np.sqrt(np.mean((table[np.asarray(_IDS)] * s) ** 2)))
      self.assertGreater(rms, 0.5) if scale is None else self.assertLess(rms, 0.05)

  @chex.variants(with_jit=True, without_jit=True)
  def test_bert_token_embedding_is_scaled(self):
    cfg = models.bert_tiny(num_layers=1, positions="sinusoidal")
    model = models.BERT(cfg)
    variables = nn.unbox(model.init(jax.random.key(1), _IDS))
    _, state = self.variant(lambda v: model.apply(v, _IDS, capture_intermediates=True))(
        variables)
    (looked_up,) = state["intermediates"]["token_embedding"]["__call__"]
    table = np.asarray(variables["params"]["token_embedding"]["embedding"], np.float64)
    np.testing.assert_allclose(looked_up, table[np.asarray(_IDS)] * math.sqrt(32),
                               rtol=1e-6, atol=1e-6)

  @chex.variants(with_jit=True, without_jit=True)
  def test_vit_patch_projection(self):
    """Scaled: kernel sqrt(d) times smaller than lecun-normal, output times sqrt(d)."""
    images = jnp.asarray(_rng.normal(size=(2, 8, 8, 3)), jnp.float32)
    plain_cfg = models.vit_tiny(positions="sinusoidal", scale_embeddings=False)
    cfg = models.vit_tiny(positions="sinusoidal")
    params = nn.unbox(models.ViT(cfg).init(jax.random.key(0), images))["params"]
    plain = nn.unbox(models.ViT(plain_cfg).init(jax.random.key(0), images))["params"]
    d = cfg.embed_dim
    np.testing.assert_allclose(params["patch_embedding"]["kernel"],
                               plain["patch_embedding"]["kernel"] / math.sqrt(d),
                               rtol=1e-5, atol=1e-7)
    # The same parameters through both: the scaled model's patches are sqrt(d) larger.
    def patches(config, p):
      _, state = models.ViT(config).apply({"params": p}, images,
                                          capture_intermediates=True)
      return state["intermediates"]["patch_embedding"]["__call__"][0]
    got = self.variant(lambda p: models.ViT(cfg).apply({"params": p}, images))(params)
    self.assertTrue(np.isfinite(np.asarray(got)).all())
    flat = np.asarray(images, np.float64).reshape(2, 2, 4, 2, 4, 3).transpose(
        0, 1, 3, 2, 4, 5).reshape(2, 4, 48)
    kernel = np.asarray(params["patch_embedding"]["kernel"], np.float64)
    np.testing.assert_allclose(patches(cfg, params), flat @ kernel, rtol=1e-5, atol=1e-5)
    changed = {**params, "head": params["head"]}
    a = models.ViT(cfg).apply({"params": changed}, images)
    b = models.ViT(plain_cfg).apply({"params": changed}, images)
    self.assertGreater(float(jnp.max(jnp.abs(a - b))), 1e-4)

  def test_encoder_decoder_unchanged_default(self):
    cfg = models.transformer_tiny()
    self.assertTrue(cfg.scale_embeddings)
    model = models.EncoderDecoder(cfg)
    params = nn.unbox(model.init(jax.random.key(0), _IDS, _IDS))["params"]
    table = np.asarray(params["source_embedding"]["embedding"])
    d = cfg.embed_dim
    self.assertAlmostEqual(float(table.std()), d ** -0.5, delta=0.15 * d ** -0.5)
