"""Attention temperature and hard attention as config fields of every model.

``attention_scale_multiplier`` (beta = multiplier / sqrt(head_dim)) and
``attention_hard`` (arg-max attention) reach every attention sublayer of every model.
"""

from __future__ import annotations

from absl.testing import parameterized
import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxformer import models
from jaxformer.layers.blocks import BlockConfig, attention_scale

_rng = np.random.default_rng(0)
_TOKENS = _rng.integers(0, 16, (2, 8)).astype(np.int32)

# name -> (config preset, module class, inputs); every model at its smallest.
_MODELS = {
    "gpt": (models.gpt_tiny, models.GPT, (_TOKENS,)),
    "bert": (lambda **kw: models.bert_tiny(num_layers=1, **kw), models.BERT, (_TOKENS,)),
    "encoder_decoder": (
        lambda **kw: models.transformer_tiny(num_encoder_layers=1, num_decoder_layers=1,
                                             **kw),
        models.EncoderDecoder, (_TOKENS[:, :6], _TOKENS[:, :5])),
    "vit": (models.vit_tiny, models.ViT, (_rng.normal(size=(2, 8, 8, 3)),)),
    "image_gpt": (lambda **kw: models.image_gpt_tiny(num_layers=1, **kw),
                  models.ImageGPT, (_rng.integers(0, 17, (2, 16)).astype(np.int32),)),
    "axial_classifier": (models.axial_tiny, models.AxialClassifier,
                         (_rng.normal(size=(2, 4, 4, 3)),)),
    "axial_transformer": (models.axial_tiny, models.AxialTransformer,
                          (_rng.integers(0, 16, (2, 4, 4)).astype(np.int32),)),
}
# model name -> a preset of it (config_from_dict starts from the model's defaults).
_MODEL_NAMES = ("gpt", "bert", "encoder_decoder", "vit", "image_gpt", "axial_transformer")


def _weights(name: str, **overrides) -> list[np.ndarray]:
  """Every attention map ``[..., Lq, Lk]`` the model sows, as float64."""
  preset, cls, inputs = _MODELS[name]
  model = cls(preset(return_weights=True, **overrides))
  variables = model.init(jax.random.key(0), *inputs)
  _, state = model.apply(variables, *inputs, mutable=["intermediates"])
  leaves = jax.tree_util.tree_leaves_with_path(state["intermediates"])
  maps = [np.asarray(w, np.float64) for path, w in leaves
          if "attention_weights" in jax.tree_util.keystr(path)]
  assert maps, name
  return maps


def _gpt_qkv_scaled(variables, factor):
  """GPT variables with every query projection (kernel and bias) times ``factor``."""
  def scale(path, x):
    keys = [getattr(k, "key", None) for k in path]
    if "qkv" in keys:   # kernel [E, 3, H, D] / bias [3, H, D]: index 0 is the query
      axis = 1 if keys[-1] == "kernel" else 0
      return x.at[(slice(None),) * axis + (0,)].multiply(factor)
    return x
  return jax.tree_util.tree_map_with_path(scale, variables)


class ValidationTest(parameterized.TestCase):

  @parameterized.product(
      name=_MODEL_NAMES,
      bad=(dict(attention_scale_multiplier=-1.0), dict(attention_scale_multiplier="2"),
           dict(attention_scale_multiplier=True),
           dict(attention_scale_multiplier=float("nan")),
           dict(attention_hard=True, attention_scale_multiplier=2.0)))
  def test_bad_values_name_the_field(self, name, bad):
    with self.assertRaisesRegex(ValueError,
                                r"model\.block\.attention_(scale_multiplier|hard)"):
      models.config_from_dict(name, {"block": bad})

  @parameterized.parameters(*_MODEL_NAMES)
  def test_hard_must_be_a_bool_and_ints_become_floats(self, name):
    with self.assertRaisesRegex(ValueError, r"model\.block\.attention_hard='yes'"):
      models.config_from_dict(name, {"block": {"attention_hard": "yes"}})
    cfg = models.config_from_dict(name, {"block": {"attention_scale_multiplier": 2}})
    self.assertIsInstance(cfg.block.attention_scale_multiplier, float)
    default = models.config_from_dict(name, {})
    self.assertEqual(default.block.attention_scale_multiplier, 1.0)
    self.assertFalse(default.block.attention_hard)

  def test_block_config(self):
    with self.assertRaisesRegex(ValueError, "BlockConfig.attention_scale_multiplier"):
      BlockConfig(num_heads=2, mlp_dim=8, attention_scale_multiplier=-0.5)
    self.assertIsNone(BlockConfig(num_heads=2, mlp_dim=8).attention_scale(32))
    cfg = BlockConfig(num_heads=2, mlp_dim=8, attention_scale_multiplier=3.0)
    self.assertAlmostEqual(cfg.attention_scale(32), 3.0 / 4.0)     # head_dim 16
    cfg = BlockConfig(num_heads=2, mlp_dim=8, head_dim=4, attention_scale_multiplier=3.0)
    self.assertAlmostEqual(cfg.attention_scale(32), 1.5)

  def test_attention_scale(self):
    self.assertIsNone(attention_scale(1.0, 64))
    self.assertEqual(attention_scale(0.0, 64), 0.0)
    self.assertAlmostEqual(attention_scale(2.0, 64), 0.25)


class ScaleMultiplierTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_multiplier_equals_scaling_the_queries(self):
    # beta * q.k with beta = m / sqrt(D) is the default attention on queries times m.
    tokens = jnp.asarray(_TOKENS)
    plain = models.GPT(models.gpt_tiny())
    variables = nn.unbox(plain.init(jax.random.key(1), tokens))
    for m in (0.0, 3.0):
      hot = models.GPT(models.gpt_tiny(attention_scale_multiplier=m))
      got = self.variant(hot.apply)(variables, tokens)
      want = plain.apply(_gpt_qkv_scaled(variables, m), tokens)
      np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-5)
      if m != 1.0:
        self.assertGreater(float(jnp.max(jnp.abs(got - plain.apply(variables, tokens)))),
                           1e-4)

  def test_multiplier_one_is_the_default(self):
    tokens = jnp.asarray(_TOKENS)
    plain = models.GPT(models.gpt_tiny())
    variables = plain.init(jax.random.key(1), tokens)
    same = models.GPT(models.gpt_tiny(attention_scale_multiplier=1.0))
    np.testing.assert_array_equal(same.apply(variables, tokens),
                                  plain.apply(variables, tokens))


class EveryModelTest(parameterized.TestCase):

  @parameterized.named_parameters((n, n) for n in _MODELS)
  def test_hard_attention_is_one_hot_everywhere(self, name):
    for w in _weights(name, attention_hard=True):
      rows = w.reshape(-1, w.shape[-1])
      rows = rows[rows.sum(-1) > 0]      # rows with an allowed key
      self.assertGreater(len(rows), 0)
      np.testing.assert_array_equal(rows.max(-1), 1.0)
      np.testing.assert_array_equal(rows.sum(-1), 1.0)

  @parameterized.named_parameters((n, n) for n in _MODELS)
  def test_zero_multiplier_is_uniform_over_allowed_keys(self, name):
    soft = _weights(name)
    for w in _weights(name, attention_scale_multiplier=0.0):
      rows = w.reshape(-1, w.shape[-1])
      rows = rows[rows.sum(-1) > 0]
      allowed = (rows > 0).sum(-1)
      np.testing.assert_allclose(rows.max(-1), 1.0 / allowed, rtol=1e-6)
      np.testing.assert_allclose(rows.min(-1, where=rows > 0, initial=1.0),
                                 1.0 / allowed, rtol=1e-6)
    # ... which the default maps (at init) are not.
    self.assertGreater(max(float(np.std(w.max(-1))) for w in soft), 1e-4)


class HardGradientTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_no_gradient_reaches_queries_and_keys(self):
    tokens = jnp.asarray(_TOKENS)
    model = models.GPT(models.gpt_tiny(attention_hard=True, num_layers=1))
    variables = nn.unbox(model.init(jax.random.key(0), tokens))

    def loss(params):
      logits = model.apply({"params": params}, tokens)
      return jnp.mean(jax.nn.log_softmax(logits)[..., 0])

    grads = self.variant(jax.grad(loss))(variables["params"])
    qkv = grads["decoder"]["layers_0"]["self_attention"]["qkv"]
    np.testing.assert_array_equal(qkv["kernel"][:, :2], 0.0)   # query, key
    np.testing.assert_array_equal(qkv["bias"][:2], 0.0)
    self.assertGreater(float(jnp.max(jnp.abs(qkv["kernel"][:, 2]))), 0.0)   # value

  @chex.variants(with_jit=True, without_jit=True)
  def test_straight_through_trains_queries_and_keys(self):
    """attention_hard="straight_through": the same one-hot forward as True, and the
    query/key projections get gradients (hard=True gives them none, above)."""
    tokens = jnp.asarray(_TOKENS)
    hard = models.GPT(models.gpt_tiny(attention_hard=True, num_layers=1))
    st = models.GPT(models.gpt_tiny(attention_hard="straight_through", num_layers=1,
                                    attention_scale_multiplier=2.0))
    variables = nn.unbox(st.init(jax.random.key(0), tokens))
    st_one = models.GPT(models.gpt_tiny(attention_hard="straight_through", num_layers=1))
    np.testing.assert_array_equal(hard.apply(variables, tokens),
                                  st_one.apply(variables, tokens))

    def loss(params):
      logits = st.apply({"params": params}, tokens)
      return jnp.mean(jax.nn.log_softmax(logits)[..., 0])

    grads = self.variant(jax.grad(loss))(variables["params"])
    qkv = grads["decoder"]["layers_0"]["self_attention"]["qkv"]
    for i in range(3):   # query, key, value
      self.assertGreater(float(jnp.max(jnp.abs(qkv["kernel"][:, i]))), 0.0)
