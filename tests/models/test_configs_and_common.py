"""Config classes and presets constructed directly, and the shared helpers in ``common``."""

from __future__ import annotations

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import parameterized

from jaxformer import models
from jaxformer.models import common


def _count(module, *inputs) -> int:
  shapes = jax.eval_shape(module.init, jax.random.key(0), *inputs)
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(shapes["params"])))


class ConfigTest(parameterized.TestCase):

  def test_transformer_presets_match_the_paper_and_count(self):
    base, big = models.transformer_base(), models.transformer_big()
    self.assertIsInstance(base, models.EncoderDecoderConfig)
    self.assertEqual((base.num_encoder_layers, base.num_decoder_layers, base.embed_dim,
                      base.block.num_heads, base.block.mlp_dim, base.block.dropout_rate,
                      base.block.norm), (6, 6, 512, 8, 2048, 0.1, "post"))
    self.assertEqual((big.embed_dim, big.block.num_heads, big.block.mlp_dim,
                      big.block.dropout_rate), (1024, 16, 4096, 0.3))
    # Shared, tied 32k vocabulary, sinusoidal positions, post-LN (no final norms):
    # V*D + 6 * (attention + FFN + 2 LN) + 6 * (2 attention + FFN + 3 LN).
    d, f, v = 512, 2048, 32000
    attn, ffn, ln = 4 * d * d + 4 * d, 2 * d * f + f + d, 2 * d
    want = v * d + 6 * (attn + ffn + 2 * ln) + 6 * (2 * attn + ffn + 3 * ln)
    tokens = jnp.zeros((1, 8), jnp.int32)
    got = _count(models.EncoderDecoder(models.transformer_base(scan_layers=True)), tokens,
                 tokens)
    self.assertEqual(got, want)
    self.assertEqual(want, 60_522_496)

  @parameterized.parameters(
      (models.EncoderDecoderConfig, dict(block=dict(num_heads=8, mlp_dim=8, norm="mid"))),
      (models.EncoderDecoderConfig, dict(source_vocab_size=10, target_vocab_size=12)),
      (models.ViTConfig, dict(image_size=30, patch_size=16)),
      (models.ViTConfig, dict(pooling="gap")),
      (models.ImageGPTConfig, dict(num_clusters=1)),
      (models.ImageGPTConfig, dict(image_size=(4, 0))),
      (models.AxialTransformerConfig, dict(positions="sinusoidal")),
      (models.GPTConfig, dict(block=dict(num_heads=8, mlp_dim=8, attention_impl="flash"))),
      (models.GPTConfig, dict(embed_dim=30)),               # not divisible by 12 heads
      (models.GPTConfig, dict(vocab_pad_multiple=0)))
  def test_direct_construction_validates(self, cls, kwargs):
    with self.assertRaises(ValueError):
      cls(**kwargs)

  def test_defaults_construct(self):
    for cls in (models.EncoderDecoderConfig, models.ViTConfig, models.ImageGPTConfig,
                models.AxialTransformerConfig, models.GPTConfig, models.BERTConfig):
      cfg = cls()
      self.assertEqual(cfg.block.dtype, jnp.float32, cls)
    self.assertEqual(models.ImageGPTConfig(image_size=4).seq_len, 16)


class CommonTest(chex.TestCase):

  def test_replace_names_unknown_fields(self):
    cfg = common.replace(models.gpt_tiny(), num_layers=3)
    self.assertEqual(cfg.num_layers, 3)
    with self.assertRaisesRegex(TypeError, r"GPTConfig has no field\(s\) \['num_layer'\]"):
      common.replace(cfg, num_layer=3)

  def test_replace_routes_block_fields_flat_or_nested(self):
    cfg = models.gpt_tiny()
    flat = models.override(cfg, num_heads=4, dropout_rate=0.1)
    nested = models.override(cfg, block={"num_heads": 4, "dropout_rate": 0.1})
    self.assertEqual(flat, nested)
    self.assertEqual((flat.block.num_heads, flat.block.mlp_dim), (4, cfg.block.mlp_dim))
    with self.assertRaisesRegex(TypeError, "block fields"):
      models.override(cfg, num_head=4)

  def test_check_common_normalises_dtypes_and_validates(self):
    cfg = models.gpt_tiny(dtype="bfloat16")
    self.assertEqual(cfg.block.dtype, jnp.bfloat16)
    with self.assertRaisesRegex(ValueError, "GPTConfig.positions='alibi'"):
      models.gpt_tiny(positions="alibi")
    with self.assertRaisesRegex(ValueError, "needs an even block.head_dim"):
      models.gpt_tiny(positions="rotary", embed_dim=6, num_heads=2)

  def test_check_tokens(self):
    common.check_tokens("ids", np.zeros((2, 4), np.int32), max_length=4)
    with self.assertRaisesRegex(TypeError, "ids must be integer"):
      common.check_tokens("ids", np.zeros((2, 4), np.float32))
    with self.assertRaisesRegex(ValueError, "rank 3"):
      common.check_tokens("ids", np.zeros((2, 4), np.int32), ndim=3)
    with self.assertRaisesRegex(ValueError, "length 5 exceeds max_len=4"):
      common.check_tokens("ids", np.zeros((2, 5), np.int32), max_length=4)

  def test_decode_positions_advance(self):
    module = common.DecodePositions()
    variables = module.init(jax.random.key(0), jnp.zeros((2, 3), jnp.int32))
    np.testing.assert_array_equal(
        module.apply(variables, jnp.zeros((2, 3), jnp.int32), mutable=["cache"])[0],
        np.tile(np.arange(3), (2, 1)))
    cache = variables["cache"]
    for start in (0, 1, 3):
      length = 2 if start == 1 else 1
      pos, state = module.apply({"cache": cache}, jnp.zeros((2, length), jnp.int32),
                                mutable=["cache"])
      cache = state["cache"]
      np.testing.assert_array_equal(pos, np.tile(start + np.arange(length), (2, 1)))

  def test_add_positions_and_constrain(self):
    x = jnp.ones((1, 3, 4))
    pos = jnp.arange(3, dtype=jnp.int32)[None]

    class Wrap(nn.Module):
      kind: str

      @nn.compact
      def __call__(self, x):
        cfg = models.gpt_tiny(positions=self.kind)
        return common.constrain(common.add_positions(x, pos, cfg, max_len=5))

    for kind in ("rotary", "none"):
      np.testing.assert_array_equal(Wrap(kind).apply({}, x), x)
    sin = Wrap("sinusoidal").apply({}, x)
    np.testing.assert_allclose(sin[0, :, 0], 1.0 + np.sin(np.arange(3)), atol=1e-6)
    variables = Wrap("learned").init(jax.random.key(0), x)
    table = nn.unbox(variables["params"]["position_embedding"]["embedding"])
    self.assertEqual(table.shape, (5, 4))
    np.testing.assert_allclose(Wrap("learned").apply(variables, x), 1.0 + table[None, :3],
                               atol=1e-6)
