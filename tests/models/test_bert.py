"""BERT: head outputs, padding invariance, pooling, permutation equivariance."""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import parameterized

from jaxformer import models
from jaxformer.models import BERT, BERTConfig, bert_tiny, masked_pool, nyu_imdb_classifier

_B, _L = 2, 8
_IDS = np.random.default_rng(0).integers(1, 64, (_B, _L)).astype(np.int32)
_VALID = np.array([[1] * 8, [1] * 5 + [0] * 3], np.int32)


@functools.cache
def _model(**overrides):
  cfg = bert_tiny(num_layers=1, mlm_head=True, nsp_head=True, num_classes=3, **overrides)
  model = BERT(cfg)
  variables = jax.jit(model.init)(jax.random.key(0), _IDS)
  return model, variables, jax.jit(model.apply)


class BERTTest(chex.TestCase, parameterized.TestCase):

  @chex.variants(with_jit=True)
  def test_outputs(self):
    model, variables, _ = _model()
    types = np.array([[0] * 4 + [1] * 4] * _B, np.int32)
    out = self.variant(model.apply)(variables, _IDS, token_type_ids=types,
                                    attention_mask=_VALID)
    chex.assert_shape([out["sequence"], out["pooled"], out["mlm_logits"],
                       out["nsp_logits"], out["logits"]],
                      [(_B, _L, 32), (_B, 32), (_B, _L, 64), (_B, 2), (_B, 3)])
    for key in ("mlm_logits", "nsp_logits", "logits"):
      chex.assert_type(out[key], jnp.float32)

  def test_structure(self):
    _, variables, _ = _model()
    self.assertTrue({"embedding_norm", "pooler", "token_type_embedding", "mlm_bias",
                     "mlm_transform", "mlm_norm", "nsp", "classifier"}
                    <= set(variables["params"]))
    self.assertNotIn("final_norm", variables["params"]["encoder"])      # post-LN

  def test_padding_invariance(self):
    _, variables, apply = _model()
    out = apply(variables, _IDS, attention_mask=_VALID)
    other = _IDS.copy()
    other[1, 5:] = 3                                     # change only padded tokens
    out2 = apply(variables, other, attention_mask=_VALID)
    np.testing.assert_allclose(out["sequence"][1, :5], out2["sequence"][1, :5], atol=1e-5)
    for key in ("pooled", "nsp_logits", "logits"):
      np.testing.assert_allclose(out[key], out2[key], atol=1e-5)
    # Without the mask the padded tokens do matter (the test can fail).
    out3 = apply(variables, other)
    self.assertGreater(np.abs(out3["sequence"][1, :5] - out["sequence"][1, :5]).max(), 1e-4)
    # padding_mask is an alias; the chunked attention path agrees with xla.
    chunked = BERT(bert_tiny(num_layers=1, mlm_head=True, nsp_head=True, num_classes=3,
                             attention_impl="chunked"))
    out4 = jax.jit(chunked.apply)(variables, _IDS, padding_mask=_VALID)
    for key in ("sequence", "pooled", "mlm_logits", "logits"):
      np.testing.assert_allclose(out4[key], out[key], atol=1e-5)

  @parameterized.parameters("mean", "max")
  def test_masked_pooling_matches_numpy(self, kind):
    x = np.random.default_rng(1).normal(size=(_B, _L, 4)).astype(np.float32)
    got = masked_pool(x, _VALID, kind)
    want = np.stack([getattr(np, kind)(x[b, _VALID[b] == 1], axis=0) for b in range(_B)])
    np.testing.assert_allclose(got, want, rtol=1e-6)

  def test_mean_pooling_model_ignores_padding(self):
    _, variables, apply = _model(pooling="mean")
    out = apply(variables, _IDS, attention_mask=_VALID)
    np.testing.assert_allclose(out["pooled"], masked_pool(out["sequence"], _VALID, "mean"),
                               atol=1e-6)

  def test_mlm_positions_gather(self):
    _, variables, apply = _model()
    full = apply(variables, _IDS)["mlm_logits"]
    pos = np.array([[1, 6], [0, 3]], np.int32)
    picked = apply(variables, _IDS, mlm_positions=pos)["mlm_logits"]
    np.testing.assert_allclose(picked, np.take_along_axis(full, pos[:, :, None], 1),
                               atol=1e-5)

  def test_without_positions_is_permutation_equivariant(self):
    _, variables, apply = _model(positions="none")
    perm = np.array([3, 0, 7, 1, 2, 6, 5, 4])
    seq = apply(variables, _IDS)["sequence"]
    seq_p = apply(variables, _IDS[:, perm])["sequence"]
    np.testing.assert_allclose(seq_p, seq[:, perm], atol=1e-5)
    # With learned positions it is not.
    _, variables, apply = _model()
    seq = apply(variables, _IDS)["sequence"]
    seq_p = apply(variables, _IDS[:, perm])["sequence"]
    self.assertGreater(np.abs(seq_p - seq[:, perm]).max(), 1e-3)

  def test_errors(self):
    with self.assertRaisesRegex(ValueError, "pooling='first'"):
      BERTConfig(pooling="first")
    model, variables, _ = _model()
    with self.assertRaisesRegex(ValueError, "attention_mask shape"):
      model.apply(variables, _IDS, attention_mask=_VALID[:, :4])
    with self.assertRaisesRegex(ValueError, "max_of_logits"):
      bert_tiny(pooling="max_of_logits")                    # no classifier
    with self.assertRaisesRegex(ValueError, "max_of_logits"):
      bert_tiny(pooling="max_of_logits", num_classes=2, nsp_head=True)


class PoolingTest(chex.TestCase, parameterized.TestCase):

  def test_the_options_in_the_notes_order(self):
    self.assertEqual(models.POOLINGS, ("cls", "max", "mean", "max_of_logits"))

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters("max", "mean", "max_of_logits")
  def test_classifier_pooling_matches_numpy(self, pooling):
    model = BERT(bert_tiny(num_layers=1, num_classes=3, pooling=pooling))
    variables = jax.jit(model.init)(jax.random.key(0), _IDS)
    out = self.variant(model.apply)(variables, _IDS, attention_mask=_VALID)
    h = np.asarray(out["sequence"], np.float64)
    w = np.asarray(variables["params"]["classifier"]["kernel"].value, np.float64)
    b = np.asarray(variables["params"]["classifier"]["bias"].value, np.float64)
    rows = []
    for r in range(_B):
      h_r = h[r, _VALID[r] == 1]                           # real tokens only
      if pooling == "max_of_logits":                      # max_t Linear(h_t)
        rows.append((h_r @ w + b).max(axis=0))
      else:                                                # Linear(pool_t h_t)
        rows.append(getattr(np, pooling)(h_r, axis=0) @ w + b)
    np.testing.assert_allclose(out["logits"], np.stack(rows), atol=1e-5, rtol=1e-5)
    self.assertNotIn("pooler", variables["params"])


class NYUClassifierTest(parameterized.TestCase):

  def test_preset_is_the_model_of_the_notes(self):
    cfg = nyu_imdb_classifier()
    b = cfg.block
    self.assertEqual((cfg.num_layers, cfg.embed_dim, b.num_heads, b.mlp_dim,
                      cfg.positions, cfg.vocab_size, cfg.num_classes, cfg.pooling),
                     (1, 32, 2, 128, "sinusoidal", 50_002, 2, "max_of_logits"))
    self.assertEqual((b.qkv_bias, b.out_bias), (False, True))
    model = BERT(cfg)
    variables = jax.jit(model.init)(jax.random.key(0), _IDS)
    attn = variables["params"]["encoder"]["layers_0"]["self_attention"]
    self.assertNotIn("bias", attn["qkv"])                  # no bias on W_q, W_k, W_v
    self.assertIn("bias", attn["out"])                     # a bias on W_h
    self.assertNotIn("position_embedding", variables["params"])    # sinusoidal
    self.assertNotIn("token_type_embedding", variables["params"])
    out = jax.jit(model.apply)(variables, _IDS, attention_mask=_VALID)
    chex.assert_shape(out["logits"], (_B, 2))
    # 50,002 x 32 embeddings + one layer + the 2-class head.
    d, f = 32, 128
    layer = 3 * d * d + (d * d + d) + (d * f + f) + (f * d + d) + 2 * 2 * d
    want = 50_002 * d + 2 * d + layer + d * 2 + 2
    self.assertEqual(models.num_params(cfg, variables["params"]), want)

  @parameterized.parameters("bert_tiny", "nyu_imdb_classifier")
  def test_sinusoidal_positions_from_a_config_section(self, preset):
    section = models.preset_dict(preset, positions="sinusoidal", num_classes=2)
    cfg, model = models.build_model(section)
    variables = jax.jit(model.init)(jax.random.key(0), _IDS)
    out = jax.jit(model.apply)(variables, _IDS)
    self.assertTrue(np.isfinite(np.asarray(out["logits"])).all())

