"""Attention maps: weights per layer, rollout (vs a float64 NumPy reference), axial maps."""

from __future__ import annotations

from absl.testing import parameterized
import chex
import jax
import jax.numpy as jnp
import numpy as np

from jaxformer import analysis
from jaxformer.attention import AxialAttention
from jaxformer.layers.blocks import stack_layer_params
from jaxformer.models import (GPT, ViT, AxialClassifier, AxialTransformer, axial_tiny,
                              gpt_tiny, vit_tiny)


def _tokens(batch=2, length=8, vocab=64, seed=0):
  return jnp.asarray(np.random.default_rng(seed).integers(0, vocab, (batch, length)),
                     jnp.int32)


def _gpt(**overrides):
  model = GPT(gpt_tiny(**overrides))
  tokens = _tokens()
  return model, model.init(jax.random.key(0), tokens), tokens


def _random_maps(num_layers, batch, heads, length, seed=0):
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(num_layers):
    logits = rng.normal(size=(batch, heads, length, length)) * 2.0
    w = np.exp(logits - logits.max(-1, keepdims=True))
    out.append(w / w.sum(-1, keepdims=True))
  return out


def _rollout_reference(maps, add_residual=True):
  """Abnar & Zuidema in float64: mean heads, + I, renormalise, multiply through layers."""
  batch, _, length, _ = maps[0].shape
  result = np.broadcast_to(np.eye(length), (batch, length, length))
  for w in maps:
    a = w.astype(np.float64).mean(axis=1)
    if add_residual:
      a = a + np.eye(length)
    a = a / a.sum(-1, keepdims=True)
    result = np.stack([a[b] @ result[b] for b in range(batch)])
  return result


class RolloutTest(chex.TestCase, parameterized.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(True, False)
  def test_matches_float64_reference(self, add_residual):
    maps = _random_maps(3, batch=2, heads=4, length=5)
    fn = self.variant(lambda *ws: analysis.attention_rollout(
        list(ws), add_residual=add_residual))
    got = fn(*[jnp.asarray(w, jnp.float32) for w in maps])
    want = _rollout_reference(maps, add_residual)
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5)
    np.testing.assert_allclose(np.asarray(got).sum(-1), 1.0, atol=1e-5)

  def test_one_identity_layer_is_identity(self):
    eye = jnp.broadcast_to(jnp.eye(4), (1, 2, 4, 4))
    np.testing.assert_allclose(analysis.attention_rollout([eye]), np.eye(4)[None],
                               atol=1e-6)

  def test_rejects_bad_maps(self):
    with self.assertRaisesRegex(ValueError, "empty"):
      analysis.attention_rollout([])
    with self.assertRaisesRegex(ValueError, r"weights\[1\]"):
      analysis.attention_rollout([jnp.ones((1, 2, 3, 3)), jnp.ones((1, 2, 4, 4))])


class AttentionWeightsTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_gpt_maps_are_causal_distributions(self):
    model, variables, tokens = _gpt()
    maps = self.variant(lambda v, t: analysis.attention_weights(model, v, t))(
        variables, tokens)
    self.assertEqual(list(maps), ["decoder/layers_0/self_attention",
                                  "decoder/layers_1/self_attention"])
    for w in maps.values():
      chex.assert_shape(w, (2, 2, 8, 8))
      w = np.asarray(w)
      np.testing.assert_allclose(w.sum(-1), 1.0, atol=1e-5)
      np.testing.assert_array_equal(np.triu(w, k=1), 0.0)
      self.assertGreater(w.std(), 0.0)

  def test_same_as_the_models_own_weights(self):
    model, variables, tokens = _gpt()
    maps = analysis.attention_weights(model, variables, tokens)
    native = GPT(gpt_tiny(return_weights=True))
    _, state = native.apply(variables, tokens, mutable=["intermediates"])
    want = analysis.collect_weights(state)
    self.assertEqual(list(want), list(maps))
    self.assertLen(analysis.layer_weights(maps, "layers_1"), 1)
    self.assertLen(analysis.layer_weights(maps), 2)
    for name in want:
      np.testing.assert_allclose(maps[name], want[name], atol=1e-6)
    # The captured forward pass computes the same logits as a plain one.
    np.testing.assert_allclose(
        model.apply(variables, tokens),
        native.apply(variables, tokens, mutable=["intermediates"])[0], atol=1e-5)

  def test_scanned_layers_are_split(self):
    model, variables, tokens = _gpt()
    maps = analysis.attention_weights(model, variables, tokens)
    scanned = GPT(gpt_tiny(scan_layers=True))
    scanned_maps = analysis.attention_weights(scanned, stack_layer_params(variables),
                                              tokens)
    self.assertEqual(list(scanned_maps), list(maps))
    for name in maps:
      np.testing.assert_allclose(scanned_maps[name], maps[name], atol=1e-5)

  def test_needs_a_model_with_return_weights(self):
    layer = analysis.attention_maps.nn.Dense(3)
    x = jnp.ones((1, 2))
    with self.assertRaisesRegex(TypeError, "return_weights"):
      analysis.attention_weights(layer, layer.init(jax.random.key(0), x), x)

  def test_with_weights_copies_the_model(self):
    model, _, _ = _gpt()
    copy = analysis.with_weights(model)
    self.assertTrue(copy.config.block.return_weights)
    self.assertFalse(model.config.block.return_weights)
    self.assertEqual(copy.config, gpt_tiny(return_weights=True))
    self.assertIs(analysis.with_weights(copy), copy)
    decoding = analysis.with_weights(GPT(gpt_tiny(decode=True)))
    self.assertTrue(decoding.config.block.decode)

  def test_model_without_attention_layers(self):
    model, variables, tokens = _gpt(num_layers=0)
    with self.assertRaisesRegex(ValueError, "no MultiHeadAttention"):
      analysis.attention_weights(model, variables, tokens)

  def test_collect_weights_rejects_bad_shapes(self):
    with self.assertRaisesRegex(ValueError, "expected"):
      analysis.collect_weights({"a": {"attention_weights": (jnp.ones((2, 3)),)}})


class AttentionConfigTest(chex.TestCase):
  """The maps follow the models' attention_scale_multiplier / attention_hard fields."""

  def test_hard_gives_one_hot_rows_at_the_soft_arg_max(self):
    model, variables, tokens = _gpt()
    soft = analysis.attention_weights(model, variables, tokens)
    hard = analysis.attention_weights(GPT(gpt_tiny(attention_hard=True)), variables,
                                      tokens)
    # Layer 0 sees the same inputs in both models: one-hot at the soft maps' arg-max.
    w = np.asarray(hard["decoder/layers_0/self_attention"])
    want = np.asarray(soft["decoder/layers_0/self_attention"]).argmax(-1)
    np.testing.assert_array_equal(w.argmax(-1), want)
    for w in hard.values():
      w = np.asarray(w)
      np.testing.assert_array_equal(w.max(-1), 1.0)
      np.testing.assert_array_equal(w.sum(-1), 1.0)

  def test_zero_multiplier_gives_uniform_causal_rows(self):
    model = GPT(gpt_tiny(attention_scale_multiplier=0.0))
    _, variables, tokens = _gpt()
    maps = analysis.attention_weights(model, variables, tokens)
    want = np.tril(np.ones((8, 8))) / np.arange(1, 9)[:, None]
    for w in maps.values():
      np.testing.assert_allclose(w, np.broadcast_to(want, w.shape), atol=1e-6)


class VisionTest(chex.TestCase):

  def test_vit_rollout_is_the_cls_row_of_the_rollout(self):
    model = ViT(vit_tiny(image_size=8, patch_size=2))   # 4 x 4 patches + [CLS]
    images = jnp.asarray(np.random.default_rng(0).normal(size=(2, 8, 8, 3)), jnp.float32)
    variables = model.init(jax.random.key(0), images)
    grid = analysis.vit_rollout(model, variables, images)
    chex.assert_shape(grid, (2, 4, 4))
    np.testing.assert_allclose(np.asarray(grid).sum((1, 2)), 1.0, atol=1e-5)
    maps = analysis.to_numpy(analysis.attention_weights(model, variables, images))
    ref = _rollout_reference(list(maps.values()))[:, 0, 1:]
    ref = ref / ref.sum(-1, keepdims=True)
    np.testing.assert_allclose(np.asarray(grid), ref.reshape(2, 4, 4), atol=1e-5)

  def test_vit_rollout_needs_a_vit(self):
    model, variables, tokens = _gpt()
    with self.assertRaisesRegex(TypeError, "ViT"):
      analysis.vit_rollout(model, variables, tokens)

  def test_axial_maps_are_the_lines_of_the_image(self):
    cfg = axial_tiny(image_size=(3, 5))
    model = AxialClassifier(cfg)
    images = jnp.asarray(np.random.default_rng(1).normal(size=(2, 3, 5, 3)), jnp.float32)
    variables = model.init(jax.random.key(0), images)
    maps = analysis.axial_attention_maps(model, variables, images)
    self.assertEqual(sorted(maps), ["layers_0/attention_0", "layers_0/attention_1"])
    rows = maps["layers_0/attention_0"]
    cols = maps["layers_0/attention_1"]
    chex.assert_shape(rows, (2, 3, 2, 5, 5))   # [B, height, heads, width, width]
    chex.assert_shape(cols, (2, 5, 2, 3, 3))   # [B, width, heads, height, height]
    np.testing.assert_allclose(np.asarray(rows).sum(-1), 1.0, atol=1e-5)
    # The same as the folded per-line maps of attention_weights, unfolded.
    folded = analysis.attention_weights(model, variables, images)
    np.testing.assert_allclose(
        analysis.unfold_axial(folded["layers_0/attention_1/attention"], 2), cols,
        atol=1e-6)
    # Row 1 of image 1 equals a plain attention pass over that row's normed features.
    inter = model.apply(variables, images, capture_intermediates=True,
                        mutable=["intermediates"])[1]["intermediates"]
    h_BHWD = inter["layers_0"]["attention_norm_0"]["__call__"][0]
    layer = AxialAttention(num_heads=cfg.block.num_heads, axis=2)
    p = {"params": variables["params"]["layers_0"]["attention_0"]}
    _, want = layer.apply(p, h_BHWD[1:2, 1:2], return_weights=True)   # [1, 1, H, W, W]
    np.testing.assert_allclose(rows[1, 1], want[0, 0], atol=1e-5)

  def test_causal_axial_maps(self):
    cfg = axial_tiny()
    model = AxialTransformer(cfg)
    ids = jnp.asarray(np.random.default_rng(2).integers(0, 16, (1, 4, 4)), jnp.int32)
    variables = model.init(jax.random.key(0), ids)
    maps = analysis.axial_attention_maps(model, variables, ids)
    inner = np.asarray(maps["inner_0/attention_0"])
    np.testing.assert_array_equal(np.triu(inner, k=1), 0.0)
    outer_cols = np.asarray(maps["outer_0/attention_1"])   # causal along columns
    chex.assert_shape(outer_cols, (1, 4, 2, 4, 4))
    np.testing.assert_array_equal(np.triu(outer_cols, k=1), 0.0)

  def test_axial_maps_need_axial_attention(self):
    model, variables, tokens = _gpt()
    with self.assertRaisesRegex(ValueError, "no AxialAttention"):
      analysis.axial_attention_maps(model, variables, tokens)

  def test_axial_pixel_map_matches_loops(self):
    height, width = 3, 4
    rows = _random_maps(1, batch=height, heads=2, length=width)[0][None]
    cols = _random_maps(1, batch=width, heads=2, length=height, seed=1)[0][None]
    got = np.asarray(analysis.axial_pixel_map(jnp.asarray(rows, jnp.float32),
                                              jnp.asarray(cols, jnp.float32), (2, 1)))
    want = np.zeros((height, width))
    for k in range(height):
      for l in range(width):
        want[k, l] = cols[0, 1, :, 2, k].mean() * rows[0, k, :, 1, l].mean()
    np.testing.assert_allclose(got[0], want, atol=1e-6)
    np.testing.assert_allclose(got.sum(), 1.0, atol=1e-5)
    with self.assertRaisesRegex(ValueError, "query"):
      analysis.axial_pixel_map(jnp.asarray(rows), jnp.asarray(cols), (3, 0))

  def test_unfold_axial_checks_the_batch(self):
    with self.assertRaisesRegex(ValueError, "batch=4"):
      analysis.unfold_axial(jnp.ones((6, 2, 3, 3)), 4)
    np.testing.assert_array_equal(
        analysis.unfold_axial(jnp.arange(6.0).reshape(6, 1, 1, 1), 2)[1, :, 0, 0, 0],
        [3.0, 4.0, 5.0])
