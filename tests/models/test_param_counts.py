"""Published parameter counts, from shapes only (jax.eval_shape: no memory, no compute)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import parameterized

from jaxformer import axes, models


def _count(module, *inputs) -> int:
  """The reported count: without the vocabulary padding (``models.num_params``)."""
  shapes = jax.eval_shape(module.init, jax.random.key(0), *inputs)
  return models.num_params(module.config, shapes["params"])


def _raw_count(module, *inputs) -> int:
  shapes = jax.eval_shape(module.init, jax.random.key(0), *inputs)
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(shapes["params"])))


class ParamCountTest(parameterized.TestCase):

  def test_gpt2_small(self):
    self.assertEqual(_count(models.GPT(models.gpt2_small()), jnp.zeros((1, 8), jnp.int32)),
                     124_439_808)

  def test_vocab_padding_follows_the_hardware_and_the_mesh(self):
    pad = models.common.vocab_pad_multiple
    self.assertEqual([pad("cpu"), pad("cpu", 2), pad("gpu"), pad("tpu", 3),
                      pad("gpu", 256)], [1, 2, 128, 384, 256])
    tokens = jnp.zeros((1, 8), jnp.int32)
    # None (the default): a model built on its own pads for the default backend.
    gpt2 = models.gpt2_small()
    self.assertIsNone(gpt2.vocab_pad_multiple)
    self.assertEqual(_raw_count(models.GPT(gpt2), tokens),
                     124_439_808 + (47 * 768 if jax.default_backend() != "cpu" else 0))
    # The loop resolves None for its mesh; the reported count stays the published one.
    from jaxformer.training import loop  # pylint: disable=g-import-not-at-top
    cfg, module = loop.build_model({"model": models.preset_dict("gpt2_small")}, None,
                                   platform="gpu")
    self.assertEqual(cfg.padded(cfg.vocab_size), 50304)
    self.assertEqual(_raw_count(module, tokens), 124_439_808 + 47 * 768)
    self.assertEqual(_count(module, tokens), 124_439_808)
    nano = {"model": models.preset_dict("gpt_nano")}        # 263 bytes + specials
    for platform, shards, rows in (("cpu", 1, 263), ("cpu", 2, 264), ("gpu", 1, 384),
                                   ("tpu", 4, 384)):
      cfg, module = loop.build_model(nano, None, platform=platform,
                                     vocab_shards=shards)
      self.assertEqual(cfg.padded(cfg.vocab_size), rows, platform)
      self.assertEqual(_raw_count(module, tokens) - _count(module, tokens),
                       (rows - 263) * 128)
    cfg, _ = loop.build_model({"model": models.preset_dict(
        "gpt2_small", vocab_pad_multiple=64)}, None, platform="gpu")
    self.assertEqual(cfg.vocab_pad_multiple, 64)   # a set value is kept

  def test_padding_is_stored_but_not_reported(self):
    tokens = jnp.zeros((1, 8), jnp.int32)
    # 50257 rows padded to 50304 = 393 * 128: 47 * 768 more stored parameters.
    self.assertEqual(_raw_count(models.GPT(models.gpt2_small(vocab_pad_multiple=128)),
                                tokens), 124_439_808 + 47 * 768)
    self.assertEqual(_raw_count(models.GPT(models.gpt2_small(vocab_pad_multiple=1)),
                                tokens), 124_439_808)
    untied = models.gpt_tiny(tie_embeddings=False, output_vocab_size=100,
                             vocab_pad_multiple=128)
    self.assertEqual(untied.num_padding_params(), (128 - 64 + 128 - 100) * 32)
    self.assertEqual(_count(models.GPT(untied), tokens),
                     _raw_count(models.GPT(untied), tokens) - (64 + 28) * 32)

  def test_bert_base_without_heads(self):
    self.assertEqual(_count(models.BERT(models.bert_base()), jnp.zeros((1, 8), jnp.int32)),
                     109_482_240)

  def test_vit_b16(self):
    self.assertEqual(_count(models.ViT(models.vit_b16(num_classes=1000)),
                            jnp.zeros((1, 224, 224, 3))), 86_567_656)

  # Other presets against the counts of their reference implementations (HF / timm /
  # the iGPT paper); traced with scan_layers=True, which keeps the count and traces fast.
  @parameterized.parameters(
      (models.gpt2_medium, models.GPT, 354_823_168),
      (models.gpt2_large, models.GPT, 774_030_080),
      (models.gpt2_xl, models.GPT, 1_557_611_200),
      (models.bert_large, models.BERT, 335_141_888),
      (models.vit_s16, models.ViT, 22_050_664),
      (models.vit_l16, models.ViT, 304_326_632),
      (models.image_gpt_small, models.ImageGPT, 76_707_328))
  def test_other_presets(self, preset, model_cls, expected):
    inputs = (jnp.zeros((1, 224, 224, 3)) if model_cls is models.ViT
              else jnp.zeros((1, 8), jnp.int32))
    self.assertEqual(_count(model_cls(preset(scan_layers=True)), inputs), expected)

  def test_scan_layers_keeps_the_count(self):
    tokens = jnp.zeros((1, 8), jnp.int32)
    self.assertEqual(_count(models.GPT(models.gpt2_small(scan_layers=True)), tokens),
                     124_439_808)


_KNOWN_AXES = {name for name, _ in axes.DEFAULT_RULES}


class LogicalAxesTest(parameterized.TestCase):
  """Every parameter of every model is boxed with known logical axis names."""

  @parameterized.parameters(
      (models.GPT(models.gpt_tiny()), (jnp.zeros((1, 8), jnp.int32),)),
      (models.GPT(models.gpt_tiny(scan_layers=True, tie_embeddings=False,
                                  activation="swiglu")), (jnp.zeros((1, 8), jnp.int32),)),
      (models.BERT(models.bert_tiny(mlm_head=True, nsp_head=True, num_classes=2)),
       (jnp.zeros((1, 8), jnp.int32),)),
      (models.EncoderDecoder(models.transformer_tiny(share_embeddings=False,
                                                     tie_output=False)),
       (jnp.zeros((1, 8), jnp.int32), jnp.zeros((1, 8), jnp.int32))),
      (models.ViT(models.vit_tiny()), (jnp.zeros((1, 8, 8, 3)),)),
      (models.ImageGPT(models.image_gpt_tiny()), (jnp.zeros((1, 16), jnp.int32),)),
      (models.AxialTransformer(models.axial_tiny()), (jnp.zeros((1, 4, 4), jnp.int32),)),
      (models.AxialClassifier(models.axial_tiny()), (jnp.zeros((1, 4, 4, 3)),)))
  def test_every_param_has_logical_names(self, module, inputs):
    shapes = jax.eval_shape(module.init, jax.random.key(0), *inputs)["params"]
    leaves = jax.tree.leaves(shapes, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    self.assertTrue(leaves)
    for leaf in leaves:
      self.assertIsInstance(leaf, nn.Partitioned)
      self.assertEqual(len(leaf.names), leaf.value.ndim, leaf)
      self.assertTrue(set(leaf.names) - {None} <= _KNOWN_AXES, leaf.names)
      self.assertEqual(leaf.value.dtype, jnp.float32)
