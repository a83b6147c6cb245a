"""The models registry: names, dict round trips, field-path errors, sharding checks."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import parameterized

from jaxformer import axes, models
from jaxformer.layers.blocks import BlockConfig


class RegistryTest(parameterized.TestCase):

  def test_every_preset_round_trips_through_json(self):
    for preset, (name, fn) in models.PRESETS.items():
      cfg = fn()
      d = json.loads(json.dumps(models.config_to_dict(cfg)))
      self.assertIsInstance(d["block"], dict, preset)
      self.assertEqual(models.config_from_dict(name, d), cfg, preset)
      self.assertIsInstance(cfg, models.MODELS[name][0], preset)

  def test_dtypes_are_names(self):
    d = models.config_to_dict(models.gpt_tiny(dtype="bfloat16"))
    self.assertEqual((d["block"]["dtype"], d["block"]["param_dtype"]),
                     ("bfloat16", "float32"))
    cfg = models.config_from_dict("gpt", d)
    self.assertEqual(cfg.block.dtype, jnp.bfloat16)

  def test_every_block_field_is_declared_once(self):
    block_fields = {f.name for f in dataclasses.fields(BlockConfig)}
    for cfg_cls, _ in models.MODELS.values():
      own = {f.name for f in dataclasses.fields(cfg_cls)}
      self.assertEqual(own & block_fields, set(), cfg_cls.__name__)

  @parameterized.parameters(
      ({"block": {"num_heads": 0}}, r"^model\.block\.num_heads=0: expected a positive int"),
      ({"block": {"num_kv_heads": 0}}, r"model\.block\.num_kv_heads=0"),
      ({"block": {"num_head": 4}}, r"model\.block\.num_head: not a field of BlockConfig"),
      ({"num_layer": 4}, r"model\.num_layer: not a field of GPTConfig"),
      ({"positions": "alibi"}, r"model\.positions='alibi'"),
      ({"embed_dim": 30}, r"model\.embed_dim=30 is not divisible by block\.num_heads"),
      ({"block": {"dtype": "float33"}}, r"model\.block\.dtype='float33'"),
      ({"block": {"attention_hard": "yes"}}, r"model\.block\.attention_hard='yes'"))
  def test_errors_name_the_full_field_path(self, d, pattern):
    with self.assertRaisesRegex(ValueError, pattern):
      models.config_from_dict("gpt", d)

  def test_prefix_and_unknown_model(self):
    with self.assertRaisesRegex(ValueError, r"exp\.model\.block\.mlp_dim=-1"):
      models.config_from_dict("bert", {"block": {"mlp_dim": -1}}, prefix="exp.model")
    with self.assertRaisesRegex(ValueError, r"model\.name='gpt3' is not known"):
      models.config_from_dict("gpt3", {})
    with self.assertRaisesRegex(ValueError, r"model preset='gpt5' is not known"):
      models.preset_dict("gpt5")
    with self.assertRaisesRegex(ValueError, r"model\.image_size=\[4, 0\]"):
      models.config_from_dict("image_gpt", {"image_size": [4, 0]})

  def test_preset_dict_overrides_and_build_model(self):
    section = models.preset_dict("gpt_nano", vocab_size=300, block={"dropout_rate": 0.1})
    self.assertEqual(section["name"], "gpt")
    self.assertEqual((section["vocab_size"], section["block"]["dropout_rate"],
                      section["block"]["num_heads"]), (300, 0.1, 4))
    section["block"]["num_heads"] = 8          # as a --config.model.block.num_heads=8
    cfg, model = models.build_model(section)
    self.assertIsInstance(model, models.GPT)
    self.assertEqual((cfg.vocab_size, cfg.block.num_heads, cfg.block.dropout_rate),
                     (300, 8, 0.1))
    self.assertEqual(cfg, models.gpt_nano(vocab_size=300, num_heads=8, dropout_rate=0.1))
    with self.assertRaisesRegex(ValueError, r"model\.block\.mlp_dim=0"):
      models.preset_dict("gpt_tiny", block={"mlp_dim": 0})
    # A ConfigDict section (what the CLI holds) works the same.
    from ml_collections import config_dict
    cfg2, _ = models.build_model(config_dict.ConfigDict(section))
    self.assertEqual(cfg2, cfg)

  def test_example_inputs_init_every_model(self):
    for preset in ("gpt_tiny", "bert_tiny", "transformer_tiny", "vit_tiny",
                   "image_gpt_tiny", "axial_tiny", "axial_classifier_tiny"):
      name, fn = models.PRESETS[preset]
      cfg = fn()
      module = models.MODELS[name][1](cfg)
      shapes = jax.eval_shape(module.init, jax.random.key(0),
                              *models.example_inputs(name, cfg, batch=2))
      self.assertGreater(models.num_params(cfg, shapes["params"]), 0, preset)

  def test_check_shardable_names_the_field(self):
    sizes = models.logical_axis_sizes(axes.rules_for(), {"data": 2, "tensor": 2})
    self.assertEqual((sizes[axes.HEADS], sizes[axes.ACT_BATCH], sizes[axes.EMBED]),
                     (2, 2, 1))
    models.check_shardable("gpt", models.gpt_tiny(vocab_pad_multiple=128), sizes)
    with self.assertRaisesRegex(ValueError, r"model\.block\.num_heads=3 .* 2-way .*'heads'"):
      models.check_shardable("gpt", models.gpt_tiny(num_heads=3, embed_dim=48), sizes)
    with self.assertRaisesRegex(ValueError, r"model\.vocab_size=263 .*vocab_pad_multiple"):
      models.check_shardable("gpt", models.gpt_nano(vocab_pad_multiple=1), sizes)
    with self.assertRaisesRegex(ValueError, r"model\.num_classes=3"):
      models.check_shardable("vit", models.vit_tiny(num_classes=3), sizes)
    models.check_shardable("gpt", models.gpt_nano(vocab_pad_multiple=128), sizes)  # 384
    # what the loop picks for a CPU mesh with the vocabulary split 2 ways: 263 -> 264
    pad = models.common.vocab_pad_multiple("cpu", sizes[axes.VOCAB])
    self.assertEqual(pad, 2)
    models.check_shardable("gpt", models.gpt_nano(vocab_pad_multiple=pad), sizes)


class NumParamsTest(parameterized.TestCase):

  def test_counts_boxed_or_plain_arrays(self):
    cfg = models.gpt_tiny(vocab_pad_multiple=128)
    variables = models.GPT(cfg).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
    plain = jax.tree.map(np.asarray, jax.tree.leaves(variables["params"]))
    raw = sum(x.size for x in plain)
    self.assertEqual(models.num_params(cfg, variables["params"]), raw - 64 * 32)
