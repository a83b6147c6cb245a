"""GPT: shapes/dtypes, causality, packing, KV-cache decoding, scan/remat, backends."""

from __future__ import annotations

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import parameterized

from jaxformer.layers import stack_layer_params
from jaxformer.models import (GPT, GPTConfig, gpt2_small, gpt_nano, gpt_tiny, override,
                              image_gpt_tiny)

_B, _L = 2, 8
_TOKENS = np.random.default_rng(0).integers(0, 64, (_B, _L)).astype(np.int32)


@functools.cache
def _params(**overrides):
  cfg = gpt_tiny(num_layers=1, **overrides)
  return cfg, jax.jit(GPT(cfg).init)(jax.random.key(0), _TOKENS)


class GPTTest(chex.TestCase, parameterized.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_shapes_and_float32_logits(self):
    cfg, variables = _params()
    logits = self.variant(GPT(cfg).apply)(variables, _TOKENS)
    chex.assert_shape(logits, (_B, _L, 64))
    chex.assert_type(logits, jnp.float32)
    chex.assert_tree_all_finite(logits)

  def test_bfloat16_compute_keeps_float32_params_and_logits(self):
    cfg = gpt_tiny(num_layers=1, dtype="bfloat16")           # strings are normalised
    self.assertEqual(cfg.block.dtype, jnp.bfloat16)
    variables = jax.eval_shape(GPT(cfg).init, jax.random.key(0), _TOKENS)
    self.assertTrue(all(x.dtype == jnp.float32 for x in jax.tree.leaves(variables)))
    out = jax.eval_shape(GPT(cfg).apply, variables, _TOKENS)
    self.assertEqual(out.dtype, jnp.float32)

  @parameterized.parameters("learned", "rotary", "sinusoidal")
  def test_causal_via_gradients(self, positions):
    """d logits[t] / d (input embedding at s) == 0 exactly for s > t, != 0 for s <= t."""
    cfg, variables = _params(positions=positions)
    model = GPT(cfg)
    proj_V = jax.random.normal(jax.random.key(1), (64,))

    def scores(offset_BLD):
      def add_offset(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if context.module.name == "token_embedding" and context.method_name == "__call__":
          out = out + offset_BLD
        return out
      with nn.intercept_methods(add_offset):
        return model.apply(variables, _TOKENS) @ proj_V          # [B, L]

    jac = jax.jit(jax.jacrev(scores))(jnp.zeros((_B, _L, cfg.embed_dim)))
    # jac[b, t, b', s, d]; same-example block, summed |.| over features -> [B, t, s]
    dep_BTS = np.abs(np.asarray(jac)[np.arange(_B), :, np.arange(_B)]).sum(-1)
    future = np.triu(np.ones((_L, _L), bool), 1)
    self.assertEqual(dep_BTS[:, future].max(), 0.0)
    self.assertGreater(dep_BTS[:, ~future].min(), 0.0)
    # Examples in a batch do not interact.
    other = np.asarray(jac)[0, :, 1]
    self.assertEqual(np.abs(other).max(), 0.0)

  def test_packed_segments_equal_separate_sequences(self):
    cfg, variables = _params()
    apply = jax.jit(GPT(cfg).apply)
    seg = np.array([[1, 1, 1, 2, 2, 2, 2, 2]] * _B, np.int32)
    packed = apply(variables, _TOKENS, segment_ids=seg)     # positions from segment_ids
    first = apply(variables, np.pad(_TOKENS[:, :3], ((0, 0), (0, 5))))[:, :3]
    second = apply(variables, np.pad(_TOKENS[:, 3:], ((0, 0), (0, 3))))[:, :5]
    np.testing.assert_allclose(packed[:, :3], first, atol=1e-5)
    np.testing.assert_allclose(packed[:, 3:], second, atol=1e-5)

  def test_left_padding_mask_with_positions(self):
    """An explicit mask + positions make a left-padded row equal its unpadded forward."""
    cfg, variables = _params()
    apply = jax.jit(GPT(cfg).apply)
    padded = np.concatenate([np.zeros((_B, 3), np.int32), _TOKENS[:, :5]], axis=1)
    valid_BL = np.arange(_L)[None, :] >= 3
    positions = np.broadcast_to(np.maximum(np.arange(_L) - 3, 0), (_B, _L)).astype(np.int32)
    got = apply(variables, padded, positions=positions,
                mask=np.broadcast_to(valid_BL[:, None, None, :], (_B, 1, 1, _L)))
    want = apply(variables, _TOKENS)[:, :5]
    np.testing.assert_allclose(got[:, 3:], want, atol=1e-5)

  @parameterized.parameters("learned", "rotary")
  def test_kv_cache_decoding_matches_full_forward(self, positions):
    cfg, variables = _params(positions=positions)
    full = jax.jit(GPT(cfg).apply)(variables, _TOKENS)
    decoder = GPT(override(cfg, decode=True))
    # A fresh cache is all zeros: take its shapes without compiling init.
    shapes = jax.eval_shape(decoder.init, jax.random.key(0), _TOKENS)["cache"]
    cache = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    step = jax.jit(lambda c, tok: decoder.apply({**variables, "cache": c}, tok,
                                                mutable=["cache"]))
    for t in range(_L):
      logits, mutated = step(cache, _TOKENS[:, t:t + 1])
      cache = mutated["cache"]
      np.testing.assert_allclose(logits[:, 0], full[:, t], atol=1e-5, rtol=1e-5)

  def test_scan_and_remat_match_plain(self):
    cfg = gpt_tiny()
    variables = nn.meta.unbox(jax.jit(GPT(cfg).init)(jax.random.key(0), _TOKENS))
    want = jax.jit(GPT(cfg).apply)(variables, _TOKENS)
    scanned = GPT(gpt_tiny(scan_layers=True, remat=True))
    got = jax.jit(scanned.apply)(stack_layer_params(variables), _TOKENS)
    np.testing.assert_allclose(got, want, atol=1e-5)

  def test_attention_implementations_agree(self):
    cfg, variables = _params()
    seg = np.array([[1, 1, 1, 2, 2, 2, 2, 2]] * _B, np.int32)
    outs = [jax.jit(GPT(gpt_tiny(num_layers=1, attention_impl=impl)).apply)(
        variables, _TOKENS, segment_ids=seg) for impl in ("xla", "chunked")]
    np.testing.assert_allclose(outs[0], outs[1], atol=1e-5)

  def test_return_weights_in_intermediates(self):
    cfg, variables = _params()
    model = GPT(gpt_tiny(num_layers=1, return_weights=True))
    _, state = jax.jit(lambda v, x: model.apply(v, x, mutable=["intermediates"]))(
        variables, _TOKENS)
    (w,) = state["intermediates"]["decoder"]["layers_0"]["self_attention"][
        "attention_weights"]
    chex.assert_shape(w, (_B, 2, _L, _L))
    np.testing.assert_allclose(w.sum(-1), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.triu(w, 1), 0.0, atol=1e-7)  # causal

  def test_dropout_needs_rng_and_changes_output(self):
    _, variables = _params()
    cfg = gpt_tiny(num_layers=1, dropout_rate=0.5)
    apply = jax.jit(GPT(cfg).apply, static_argnames="deterministic")
    a = apply(variables, _TOKENS)
    b = apply(variables, _TOKENS, deterministic=False, rngs={"dropout": jax.random.key(1)})
    self.assertGreater(np.abs(a - b).max(), 1e-4)

  def test_untied_head_and_presets(self):
    cfg = gpt_tiny(num_layers=1, tie_embeddings=False, vocab_pad_multiple=128)
    shapes = jax.eval_shape(GPT(cfg).init, jax.random.key(0), _TOKENS)
    # [D, V] padded to a multiple of 128; the logits are sliced back to V = 64.
    self.assertEqual(shapes["params"]["lm_head"]["kernel"].value.shape, (32, 128))
    nano = gpt_nano()
    self.assertEqual((nano.num_layers, nano.embed_dim, nano.block.num_heads, nano.max_len),
                     (4, 128, 4, 64))

  def test_scaled_residual_init_std(self):
    """GPT-2 / nanoGPT: residual-output projections get init_stddev / sqrt(2 * layers)."""
    cfg = gpt_tiny(num_layers=8, embed_dim=64, mlp_dim=256, scan_layers=True)
    self.assertTrue(cfg.scaled_residual_init)       # the default, as in GPT-2
    params = nn.unbox(jax.jit(GPT(cfg).init)(jax.random.key(0), _TOKENS[:1, :4]))
    layers = params["params"]["decoder"]["layers"]  # scanned: [8, ...] per kernel
    residual = 0.02 / np.sqrt(2 * 8)
    self.assertAlmostEqual(cfg.block_config().residual_init_stddev, residual)
    # >= 32768 normal samples per kernel: sample stds are within ~0.4% (1 sigma).
    for kernel, want in ((layers["self_attention"]["out"]["kernel"], residual),
                         (layers["mlp"]["wo"]["kernel"], residual),
                         (layers["self_attention"]["qkv"]["kernel"], 0.02),
                         (layers["mlp"]["wi"]["kernel"], 0.02)):
      self.assertAlmostEqual(float(np.asarray(kernel, np.float64).std()) / want, 1.0,
                             delta=0.03, msg=kernel.shape)
    # Off: every kernel uses init_stddev (the block-level wiring is tested in layers/).
    off = gpt_tiny(num_layers=8, scaled_residual_init=False)
    self.assertIsNone(off.block_config().residual_init_stddev)   # = the kernels' init
    self.assertEqual(off.block_config().init_stddev, 0.02)
    with self.assertRaisesRegex(ValueError, "block.residual_init_stddev"):
      gpt_tiny(residual_init_stddev=0.01)          # with scaled_residual_init=True
    self.assertAlmostEqual(cfg.block_config().residual_init_stddev, residual)
    # GPT-2 does it, so the default config and every preset do; ImageGPT passes it on.
    self.assertTrue(GPTConfig().scaled_residual_init)
    self.assertTrue(gpt2_small().scaled_residual_init)
    self.assertFalse(image_gpt_tiny(scaled_residual_init=False).gpt_config()
                     .scaled_residual_init)
    self.assertTrue(image_gpt_tiny().gpt_config().scaled_residual_init)
    with self.assertRaisesRegex(TypeError, "scaled_residual_init='yes'"):
      gpt_tiny(scaled_residual_init="yes")

  @parameterized.parameters(
      dict(positions="alibi"), dict(attention_impl="flash"), dict(activation="tanh"),
      dict(embed_dim=30, num_heads=4), dict(norm="sandwich"),
      dict(tie_embeddings=True, output_vocab_size=10))
  def test_config_errors(self, **kwargs):
    with self.assertRaises(ValueError):
      gpt_tiny(**{**dict(vocab_size=8, max_len=8, num_layers=1, embed_dim=8,
                         num_heads=2, mlp_dim=8), **kwargs})

  def test_input_errors(self):
    cfg, variables = _params()
    with self.assertRaisesRegex(ValueError, "max_len=16"):
      GPT(cfg).apply(variables, np.zeros((1, 17), np.int32))
    with self.assertRaisesRegex(TypeError, "integer"):
      GPT(cfg).apply(variables, np.zeros((1, 4), np.float32))
    with self.assertRaises(TypeError):
      gpt_tiny(num_layer=3)
    with self.assertRaisesRegex(TypeError, "dtype"):
      gpt_tiny(dtype="float33")


class VocabPaddingTest(chex.TestCase, parameterized.TestCase):

  @parameterized.parameters(True, False)
  def test_padded_rows_are_invisible(self, tied):
    """Padding changes no logit and gets no gradient; the logits have the real vocab."""
    cfg, variables = _params(tie_embeddings=tied, output_vocab_size=None if tied else 50,
                             vocab_pad_multiple=128)
    out_vocab = 64 if tied else 50
    params = nn.unbox(variables)["params"]
    self.assertEqual(params["token_embedding"]["embedding"].shape, (128, 32))
    logits = jax.jit(GPT(cfg).apply)({"params": params}, _TOKENS)
    chex.assert_shape(logits, (_B, _L, out_vocab))
    # The same real rows without padding give the same logits.
    unpadded = GPT(override(cfg, vocab_pad_multiple=1))
    cut = jax.tree_util.tree_map_with_path(
        lambda path, x: x[:64] if "token_embedding" in jax.tree_util.keystr(path)
        else x[:, :out_vocab] if "lm_head" in jax.tree_util.keystr(path) else x, params)
    np.testing.assert_allclose(unpadded.apply({"params": cut}, _TOKENS), logits, atol=1e-5)

    def loss(p):
      return jax.nn.logsumexp(GPT(cfg).apply({"params": p}, _TOKENS), -1).sum()
    grads = jax.grad(loss)(params)
    np.testing.assert_array_equal(grads["token_embedding"]["embedding"][64:], 0.0)
    if not tied:
      np.testing.assert_array_equal(grads["lm_head"]["kernel"][:, 50:], 0.0)

  def test_decoding_past_the_cache_is_nan_not_wrong(self):
    cfg, variables = _params()
    decoder = GPT(override(cfg, decode=True))
    shapes = jax.eval_shape(decoder.init, jax.random.key(0), _TOKENS[:, :4])["cache"]
    cache = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    step = jax.jit(lambda c, tok: decoder.apply({**variables, "cache": c}, tok,
                                                mutable=["cache"]))
    outs = []
    for t in range(6):
      logits, mutated = step(cache, _TOKENS[:, t:t + 1])
      cache = mutated["cache"]
      outs.append(np.asarray(logits[:, 0]))
    self.assertTrue(np.isfinite(np.stack(outs[:4])).all())
    self.assertTrue(np.isnan(np.stack(outs[4:])).all())

