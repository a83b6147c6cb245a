"""BERT: head outputs, padding invariance, pooling, permutation equivariance."""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import parameterized

from jaxformer.models import BERT, BERTConfig, bert_tiny, masked_pool

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
