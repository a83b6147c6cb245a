"""EncoderDecoder: shapes, encode/decode split, causality, source padding, KV cache."""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np

from jaxformer.models import EncoderDecoder, override, transformer_tiny

_B, _S, _T = 2, 6, 5
_rng = np.random.default_rng(0)
_SRC = _rng.integers(1, 64, (_B, _S)).astype(np.int32)
_TGT = _rng.integers(1, 64, (_B, _T)).astype(np.int32)
_SRC_VALID = np.array([[1] * 6, [1] * 4 + [0] * 2], np.int32)


@functools.cache
def _model(**overrides):
  cfg = transformer_tiny(num_encoder_layers=1, num_decoder_layers=1, **overrides)
  model = EncoderDecoder(cfg)
  variables = jax.jit(model.init)(jax.random.key(0), _SRC, _TGT)
  return cfg, model, variables


class EncoderDecoderTest(chex.TestCase):

  @chex.variants(with_jit=True)
  def test_shapes_and_split_methods(self):
    _, model, variables = _model()
    logits = self.variant(model.apply)(variables, _SRC, _TGT, _SRC_VALID)
    chex.assert_shape(logits, (_B, _T, 64))
    chex.assert_type(logits, jnp.float32)
    encode = functools.partial(model.apply, method=EncoderDecoder.encode)
    encoded = self.variant(encode)(variables, _SRC, _SRC_VALID)
    chex.assert_shape(encoded, (_B, _S, 32))
    decode = functools.partial(model.apply, method=EncoderDecoder.decode)
    split = self.variant(decode)(variables, encoded, _TGT, _SRC_VALID)
    np.testing.assert_allclose(split, logits, atol=1e-5)

  def test_structure(self):
    _, _, variables = _model()
    params = variables["params"]
    self.assertNotIn("target_embedding", params)                 # shared embeddings
    self.assertNotIn("final_norm", params["encoder"])             # post-LN
    self.assertIn("cross_attention", params["decoder"]["layers_0"])
    _, _, separate = _model(share_embeddings=False, tie_output=False, norm="pre")
    self.assertTrue({"source_embedding", "target_embedding", "output"}
                    <= set(separate["params"]))
    self.assertIn("final_norm", separate["params"]["decoder"])

  def test_decoder_causal_and_source_padding(self):
    _, model, variables = _model()
    apply = jax.jit(model.apply)
    logits = apply(variables, _SRC, _TGT, _SRC_VALID)
    tgt = _TGT.copy()
    tgt[:, 3:] = (tgt[:, 3:] + 5) % 64
    logits2 = apply(variables, _SRC, tgt, _SRC_VALID)
    np.testing.assert_allclose(logits[:, :3], logits2[:, :3], atol=1e-5)
    self.assertGreater(np.abs(logits[:, 3:] - logits2[:, 3:]).max(), 1e-4)
    src = _SRC.copy()
    src[1, 4:] = 9                                  # padded source tokens
    logits3 = apply(variables, src, _TGT, _SRC_VALID)
    np.testing.assert_allclose(logits3, logits, atol=1e-5)

  def test_kv_cache_decoding_matches_full_forward(self):
    cfg, model, variables = _model()
    full = jax.jit(model.apply)(variables, _SRC, _TGT, _SRC_VALID)
    dec = EncoderDecoder(override(cfg, decode=True))
    # A fresh cache is all zeros: take its shapes without compiling init.
    shapes = jax.eval_shape(dec.init, jax.random.key(0), _SRC, _TGT)["cache"]
    cache = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    encoded = jax.jit(functools.partial(model.apply, method=EncoderDecoder.encode))(
        variables, _SRC, _SRC_VALID)
    step = jax.jit(lambda c, tok: dec.apply(
        {**variables, "cache": c}, encoded, tok, _SRC_VALID, method=EncoderDecoder.decode,
        mutable=["cache"]))
    for t in range(_T):
      logits, mutated = step(cache, _TGT[:, t:t + 1])
      cache = mutated["cache"]
      np.testing.assert_allclose(logits[:, 0], full[:, t], atol=1e-5, rtol=1e-5)

  def test_config_errors(self):
    with self.assertRaisesRegex(ValueError, "share_embeddings"):
      transformer_tiny(source_vocab_size=10, target_vocab_size=12)
    with self.assertRaisesRegex(ValueError, "norm='mid'"):
      transformer_tiny(norm="mid")
