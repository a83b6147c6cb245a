"""ViT, ImageGPT and the axial transformers."""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import parameterized

from jaxformer import models
from jaxformer.layers import stack_layer_params

_rng = np.random.default_rng(0)
_IMAGES = _rng.normal(size=(2, 8, 8, 3)).astype(np.float32)


@functools.cache
def _init(module, *shapes_and_dtypes):
  inputs = [np.zeros(s, d) for s, d in shapes_and_dtypes]
  return jax.jit(module.init)(jax.random.key(0), *inputs)


class ViTTest(chex.TestCase, parameterized.TestCase):

  @chex.variants(with_jit=True)
  def test_shapes_and_structure(self):
    model = models.ViT(models.vit_tiny())
    variables = _init(model, ((2, 8, 8, 3), np.float32))
    params = variables["params"]
    self.assertEqual(params["position_embedding"]["embedding"].value.shape, (5, 32))
    self.assertIn("final_norm", params["encoder"])                     # pre-LN
    logits = self.variant(model.apply)(variables, _IMAGES)
    chex.assert_shape(logits, (2, 10))
    chex.assert_type(logits, jnp.float32)

  def test_scan_and_impls_match_and_weights_returned(self):
    model = models.ViT(models.vit_tiny())
    variables = _init(model, ((2, 8, 8, 3), np.float32))
    want = jax.jit(model.apply)(variables, _IMAGES)
    chunked = models.ViT(models.vit_tiny(attention_impl="chunked", scan_layers=True))
    got = jax.jit(chunked.apply)(stack_layer_params(variables), _IMAGES)
    np.testing.assert_allclose(got, want, atol=1e-5)
    weights_model = models.ViT(models.vit_tiny(return_weights=True))
    _, state = jax.jit(lambda v, x: weights_model.apply(v, x, mutable=["intermediates"]))(
        variables, _IMAGES)
    (w,) = state["intermediates"]["encoder"]["layers_1"]["self_attention"][
        "attention_weights"]
    chex.assert_shape(w, (2, 2, 5, 5))

  def test_input_and_config_errors(self):
    with self.assertRaisesRegex(ValueError, "patch_size=5"):
      models.vit_tiny(patch_size=5)
    model = models.ViT(models.vit_tiny())
    with self.assertRaisesRegex(ValueError, "images must be"):
      jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 16, 16, 3)))


class ImageGPTTest(chex.TestCase):

  def test_color_quantize_matches_numpy_and_inputs_shift(self):
    palette = _rng.uniform(size=(16, 3)).astype(np.float32)
    images = _rng.uniform(size=(2, 4, 4, 3)).astype(np.float32)
    ids = models.color_quantize(images, palette)
    want = np.argmin(((images[..., None, :].astype(np.float64) - palette) ** 2).sum(-1), -1)
    np.testing.assert_array_equal(ids, want)
    np.testing.assert_allclose(models.color_dequantize(ids, palette), palette[want])
    cfg = models.image_gpt_tiny()
    inputs, targets = models.image_gpt_inputs(ids, cfg)
    np.testing.assert_array_equal(inputs[:, 0], cfg.sos_id)
    np.testing.assert_array_equal(inputs[:, 1:], targets[:, :-1])
    np.testing.assert_array_equal(targets, np.asarray(ids).reshape(2, 16))

  def test_causal_and_kv_cache_matches_full_forward(self):
    cfg = models.image_gpt_tiny(num_layers=1)
    model = models.ImageGPT(cfg)
    ids = _rng.integers(0, 16, (2, 4, 4)).astype(np.int32)
    inputs, _ = models.image_gpt_inputs(ids, cfg)
    variables = _init(model, ((2, 16), np.int32))
    apply = jax.jit(model.apply)
    full = apply(variables, inputs)
    chex.assert_shape(full, (2, 16, 16))
    changed = np.array(inputs)
    changed[:, 9:] = (changed[:, 9:] + 3) % 16
    full2 = apply(variables, changed)
    np.testing.assert_allclose(full[:, :9], full2[:, :9], atol=1e-5)
    self.assertGreater(np.abs(full[:, 9:] - full2[:, 9:]).max(), 1e-4)
    dec = models.ImageGPT(models.image_gpt_tiny(num_layers=1, decode=True))
    # A fresh cache is all zeros: take its shapes without compiling init.
    shapes = jax.eval_shape(dec.init, jax.random.key(0), inputs)["cache"]
    cache = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    step = jax.jit(lambda c, tok: dec.apply({**variables, "cache": c}, tok,
                                            mutable=["cache"]))
    for t in range(16):
      logits, mutated = step(cache, inputs[:, t:t + 1])
      cache = mutated["cache"]
      np.testing.assert_allclose(logits[:, 0], full[:, t], atol=1e-5)


class AxialTest(chex.TestCase):

  def test_classifier(self):
    cfg = models.axial_tiny()
    model = models.AxialClassifier(cfg)
    images = _rng.normal(size=(2, 4, 4, 3)).astype(np.float32)
    variables = _init(model, ((2, 4, 4, 3), np.float32))
    logits = jax.jit(model.apply)(variables, images)
    chex.assert_shape(logits, (2, 10))
    # Unmasked row + column attention: the output at every pixel sees the whole image,
    # so the classifier is invariant to neither pixel order nor content (sanity), and
    # the "xla" and "chunked" paths agree.
    chunked = models.AxialClassifier(models.axial_tiny(attention_impl="chunked"))
    np.testing.assert_allclose(jax.jit(chunked.apply)(variables, images), logits,
                               atol=1e-5)

  def test_generative_is_causal_in_raster_order(self):
    cfg = models.axial_tiny()
    model = models.AxialTransformer(cfg)
    ids = _rng.integers(0, 16, (2, 4, 4)).astype(np.int32)
    variables = _init(model, ((2, 4, 4), np.int32))
    apply = jax.jit(model.apply)
    logits = apply(variables, ids)
    chex.assert_shape(logits, (2, 4, 4, 16))
    for (i, j) in ((0, 0), (1, 2), (2, 3), (3, 1)):
      changed = ids.reshape(2, 16).copy()
      k = i * 4 + j
      changed[:, k:] = (changed[:, k:] + 5) % 16          # pixel (i, j) and after
      logits2 = apply(variables, changed.reshape(2, 4, 4)).reshape(2, 16, 16)
      flat = logits.reshape(2, 16, 16)
      np.testing.assert_allclose(flat[:, :k + 1], logits2[:, :k + 1], atol=1e-5)
      if k + 1 < 16:
        self.assertGreater(np.abs(flat[:, k + 1:] - logits2[:, k + 1:]).max(), 1e-5)

  def test_classifier_return_weights(self):
    cfg = models.axial_tiny(image_size=(4, 6), return_weights=True)
    model = models.AxialClassifier(cfg)
    images = _rng.normal(size=(2, 4, 6, 3)).astype(np.float32)
    variables = _init(model, ((2, 4, 6, 3), np.float32))
    logits, state = jax.jit(lambda v, x: model.apply(v, x, mutable=["intermediates"]))(
        variables, images)
    chex.assert_shape(logits, (2, 10))
    layer = state["intermediates"]["layers_0"]
    (rows,) = layer["attention_0"]["axial_attention_weights"]
    (cols,) = layer["attention_1"]["axial_attention_weights"]
    chex.assert_shape(rows, (2, 4, 2, 6, 6))     # [B, height, heads, width, width]
    chex.assert_shape(cols, (2, 6, 2, 4, 4))     # [B, width, heads, height, height]
    for w in (rows, cols):
      np.testing.assert_allclose(w.sum(-1), 1.0, atol=1e-5)
      self.assertGreater(float(np.triu(w, 1).max()), 1e-3)   # unmasked
    # The unfolded view is the inner MultiHeadAttention's folded one, reshaped.
    (folded,) = layer["attention_1"]["attention"]["attention_weights"]
    np.testing.assert_allclose(cols.reshape(folded.shape), folded, atol=0)

  def test_generative_return_weights_with_remat(self):
    cfg = models.axial_tiny(image_size=(4, 6), return_weights=True, remat=True)
    model = models.AxialTransformer(cfg)
    ids = _rng.integers(0, 16, (2, 4, 6)).astype(np.int32)
    variables = _init(model, ((2, 4, 6), np.int32))
    _, state = jax.jit(lambda v, x: model.apply(v, x, mutable=["intermediates"]))(
        variables, ids)
    inter = state["intermediates"]
    want = {("outer_0", "attention_0"): ((2, 4, 2, 6, 6), False),   # rows, unmasked
            ("outer_0", "attention_1"): ((2, 6, 2, 4, 4), True),    # columns, causal
            ("inner_0", "attention_0"): ((2, 4, 2, 6, 6), True)}    # rows, causal
    self.assertEqual(sorted(inter), ["inner_0", "outer_0"])
    for (layer, sub), (shape, causal) in want.items():
      (w,) = inter[layer][sub]["axial_attention_weights"]
      chex.assert_shape(w, shape)
      np.testing.assert_allclose(w.sum(-1), 1.0, atol=1e-5)
      upper = float(np.abs(np.triu(w, 1)).max())
      if causal:
        self.assertEqual(upper, 0.0, (layer, sub))
      else:
        self.assertGreater(upper, 1e-3, (layer, sub))

  def test_config_errors(self):
    with self.assertRaisesRegex(ValueError, "positions='rotary'"):
      models.axial_tiny(positions="rotary")
    with self.assertRaisesRegex(ValueError, "scan_layers=True"):
      models.axial_tiny(scan_layers=True)
    with self.assertRaisesRegex(ValueError, "image_size"):
      models.AxialTransformerConfig(image_size=(4, 0))
    with self.assertRaisesRegex(ValueError, "patch_size"):
      models.AxialTransformerConfig(image_size=6, patch_size=4)
    with self.assertRaisesRegex(ValueError, "norm='post'"):
      models.axial_tiny(norm="post")

  def test_axial_block_mixes_only_along_its_axes(self):
    block = models.AxialBlock(models.axial_tiny().block, attend_axes=(models.ALONG_ROW,),
                              causal=(True,))
    x = _rng.normal(size=(1, 3, 5, 16)).astype(np.float32)
    variables = block.init(jax.random.key(0), x)
    y = block.apply(variables, x)
    x2 = x.copy()
    x2[0, 1, 2] += _rng.normal(size=16).astype(np.float32)   # pixel (1, 2)
    delta = np.abs(block.apply(variables, x2) - y).max(-1)[0]   # [3, 5]
    changed = delta > 1e-6
    want = np.zeros((3, 5), bool)
    want[1, 2:] = True               # same row, at or after column 2 (causal row)
    np.testing.assert_array_equal(changed, want)

  def test_cifar10_preset(self):
    cfg = models.axial_cifar10(num_layers=2)
    self.assertIsInstance(cfg, models.AxialTransformerConfig)
    self.assertEqual((cfg.image_size, cfg.num_channels, cfg.num_classes, cfg.num_clusters,
                      cfg.num_layers, cfg.embed_dim),
                     ((32, 32), 3, 10, 256, 2, 128))
