"""MLP, norms, blocks and the layer stack (pre/post-LN structure, remat/scan)."""

from __future__ import annotations

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import parameterized
from scipy import special as sp_special

from jaxformer.layers import (ACTIVATIONS, MLP, NORM_PLACEMENTS, NORM_TYPES, BlockConfig,
                              DecoderBlock, EncoderBlock, Stack, check_activation,
                              check_norm, dense, make_norm, stack_layer_params,
                              unstack_layer_params)

_NP_ACT = {
    "relu": lambda x: np.maximum(x, 0.0),
    "gelu_exact": lambda x: 0.5 * x * (1.0 + sp_special.erf(x / np.sqrt(2.0))),
    "gelu": lambda x: 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3))),
    "swiglu": lambda x: x / (1.0 + np.exp(-x)),
}


def _unbox(tree):
  return nn.meta.unbox(tree)


class MLPTest(chex.TestCase, parameterized.TestCase):

  @chex.variants(with_jit=True)
  @parameterized.parameters("relu", "gelu", "gelu_exact", "swiglu")
  def test_matches_numpy(self, activation):
    x = np.random.default_rng(0).normal(size=(2, 3, 4)).astype(np.float32)
    module = MLP(8, activation=activation)
    variables = module.init(jax.random.key(0), x)
    params = jax.tree.map(lambda a: np.asarray(a, np.float64), _unbox(variables))["params"]
    self.assertEqual(variables["params"]["wi"]["kernel"].names, ("embed", "mlp"))
    self.assertEqual(variables["params"]["wo"]["kernel"].names, ("mlp", "embed"))
    got = self.variant(module.apply)(variables, x)
    act = _NP_ACT[activation]
    h = x @ params["wi"]["kernel"] + params["wi"]["bias"]
    if activation == "swiglu":
      h = act(x @ params["wi_gate"]["kernel"] + params["wi_gate"]["bias"]) * h
    else:
      h = act(h)
    want = h @ params["wo"]["kernel"] + params["wo"]["bias"]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)

  def test_bad_activation(self):
    with self.assertRaisesRegex(ValueError, "activation='tanh'"):
      MLP(4, activation="tanh").init(jax.random.key(0), jnp.zeros((1, 2, 4)))
    with self.assertRaisesRegex(ValueError, "activation='tanh'; expected one of"):
      check_activation("tanh")
    with self.assertRaisesRegex(ValueError, "MyConfig.act='x'"):
      check_activation("x", field="MyConfig.act")
    for name in ACTIVATIONS:
      check_activation(name)

  def test_out_kernel_init_only_changes_wo(self):
    x = jnp.zeros((1, 2, 4))
    default = _unbox(MLP(8, activation="swiglu").init(jax.random.key(0), x))["params"]
    zero_out = _unbox(MLP(8, activation="swiglu", out_kernel_init=nn.initializers.zeros)
                      .init(jax.random.key(0), x))["params"]
    for name in ("wi", "wi_gate"):
      np.testing.assert_array_equal(zero_out[name]["kernel"], default[name]["kernel"])
    self.assertGreater(np.abs(default["wo"]["kernel"]).max(), 0.0)
    np.testing.assert_array_equal(zero_out["wo"]["kernel"], 0.0)

  def test_dense_carries_logical_names(self):
    layer = dense(3, "embed", "mlp", use_bias=True, dtype=jnp.float32,
                  param_dtype=jnp.float32, kernel_init=nn.initializers.ones)
    variables = layer.init(jax.random.key(0), jnp.ones((2, 4)))
    self.assertEqual(variables["params"]["kernel"].names, ("embed", "mlp"))
    self.assertEqual(variables["params"]["bias"].names, ("mlp",))
    np.testing.assert_allclose(layer.apply(variables, jnp.ones((2, 4))), 4.0)


class NormTest(parameterized.TestCase):

  def test_layernorm_and_rmsnorm(self):
    x = np.random.default_rng(1).normal(size=(2, 3, 8)).astype(np.float32) * 3 + 1
    ln = make_norm("layernorm", eps=1e-6)
    v = ln.init(jax.random.key(0), x)
    self.assertEqual(v["params"]["scale"].names, ("norm",))
    want = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(ln.apply(v, x), want, rtol=1e-4, atol=1e-4)
    rms = make_norm("rmsnorm", eps=1e-6)
    v = rms.init(jax.random.key(0), x)
    self.assertNotIn("bias", v["params"])
    want = x / np.sqrt((x**2).mean(-1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(rms.apply(v, x), want, rtol=1e-4, atol=1e-4)
    with self.assertRaisesRegex(ValueError, "norm_type='batchnorm'"):
      make_norm("batchnorm")

  def test_check_norm(self):
    for norm in NORM_PLACEMENTS:
      for norm_type in NORM_TYPES:
        check_norm(norm, norm_type)
    with self.assertRaisesRegex(ValueError, "norm='middle'"):
      check_norm("middle", "layernorm")
    with self.assertRaisesRegex(ValueError, "norm_type='groupnorm'"):
      check_norm("pre", "groupnorm")


_CFG = BlockConfig(num_heads=2, mlp_dim=16, dropout_rate=0.0)
_X = np.random.default_rng(2).normal(size=(2, 5, 8)).astype(np.float32)


class BlockConfigTest(parameterized.TestCase):

  @parameterized.parameters(dict(norm="middle"), dict(norm_type="groupnorm"),
                            dict(activation="tanh"), dict(num_heads=0),
                            dict(dropout_rate=1.0), dict(residual_init_stddev=0.0),
                            dict(init_stddev=-0.02))
  def test_invalid(self, **kwargs):
    with self.assertRaises(ValueError):
      BlockConfig(**{"num_heads": 2, "mlp_dim": 4, **kwargs})

  def test_residual_init_stddev_reaches_out_and_wo_only(self):
    cfg = BlockConfig(num_heads=4, mlp_dim=256, init_stddev=0.02,
                      residual_init_stddev=0.005)
    x = jnp.zeros((1, 2, 64))
    params = _unbox(EncoderBlock(cfg).init(jax.random.key(0), x))["params"]
    stds = {name: float(np.asarray(k, np.float64).std()) for name, k in (
        ("qkv", params["self_attention"]["qkv"]["kernel"]),
        ("out", params["self_attention"]["out"]["kernel"]),
        ("wi", params["mlp"]["wi"]["kernel"]),
        ("wo", params["mlp"]["wo"]["kernel"]))}
    # >= 4096 normal samples each: sample stds are within ~1.1% (1 sigma).
    for name, want in (("qkv", 0.02), ("out", 0.005), ("wi", 0.02), ("wo", 0.005)):
      self.assertAlmostEqual(stds[name] / want, 1.0, delta=0.06, msg=name)
    self.assertEqual(BlockConfig(num_heads=2, mlp_dim=4).out_kernel_init(), {})


class QKNormTest(chex.TestCase, parameterized.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters("layernorm", "rmsnorm")
  def test_qk_norm_normalises_each_head_before_the_dot_product(self, norm_type):
    """BlockConfig.qk_norm: attention of the block == a float64 numpy reference."""
    from jaxformer import models
    from jaxformer.attention import MultiHeadAttention
    cfg = BlockConfig(num_heads=2, mlp_dim=16, qk_norm=True, norm_type=norm_type,
                      norm_eps=1e-5)
    attn = MultiHeadAttention(**cfg.attention_kwargs(8))
    params = _unbox(attn.init(jax.random.key(0), _X))["params"]
    rng = np.random.default_rng(3)    # non-trivial scales / biases
    params = jax.tree_util.tree_map_with_path(
        lambda path, x: x + rng.normal(size=x.shape).astype(np.float32)
        if "norm" in jax.tree_util.keystr(path) else x, params)
    got = self.variant(attn.apply)({"params": params}, _X)

    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    qkv = np.einsum("ble,ethd->blthd", _X.astype(np.float64), p["qkv"]["kernel"])
    qkv = qkv + p["qkv"]["bias"]
    def norm(x, n):                                   # over head_dim
      if norm_type == "layernorm":
        x = x - x.mean(-1, keepdims=True)
        return x / np.sqrt((x ** 2).mean(-1, keepdims=True) + 1e-5) * n["scale"] + n["bias"]
      return x / np.sqrt((x ** 2).mean(-1, keepdims=True) + 1e-5) * n["scale"]
    q, k, v = norm(qkv[:, :, 0], p["query_norm"]), norm(qkv[:, :, 1], p["key_norm"]), \
        qkv[:, :, 2]
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(4)
    w = np.exp(logits - logits.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    o = np.einsum("bhqk,bkhd->bqhd", w, v)
    want = np.einsum("bqhd,hde->bqe", o, p["out"]["kernel"]) + p["out"]["bias"]
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5)
    # The knob reaches every model through its block.
    shapes = jax.eval_shape(models.GPT(models.gpt_tiny(qk_norm=True)).init,
                            jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
    self.assertIn("key_norm", shapes["params"]["decoder"]["layers_0"]["self_attention"])
    self.assertNotIn("key_norm", _unbox(EncoderBlock(_CFG).init(
        jax.random.key(0), _X))["params"]["self_attention"])


class StructureTest(parameterized.TestCase):

  def test_post_ln_output_is_normalized_and_has_no_final_norm(self):
    cfg = BlockConfig(num_heads=2, mlp_dim=16, norm="post")
    stack = Stack(EncoderBlock, cfg, 2)
    v = jax.jit(stack.init)(jax.random.key(0), _X, None, None, None)
    self.assertNotIn("final_norm", v["params"])
    y = jax.jit(stack.apply)(v, _X, None, None, None)
    # post-LN: the last op is a LayerNorm with scale 1, bias 0 at init.
    np.testing.assert_allclose(np.mean(y, -1), 0.0, atol=1e-5)
    np.testing.assert_allclose(np.std(y, -1), 1.0, atol=1e-3)

  def test_pre_ln_has_final_norm_and_residual_path(self):
    cfg = BlockConfig(num_heads=2, mlp_dim=16, norm="pre")
    v = jax.jit(Stack(EncoderBlock, cfg, 2).init)(jax.random.key(0), _X, None, None, None)
    self.assertIn("final_norm", v["params"])
    # Without the final norm, zeroing every sublayer's output projection leaves x as is.
    params = jax.tree_util.tree_map_with_path(
        lambda path, a: jnp.zeros_like(a) if any(
            getattr(k, "key", None) in ("out", "wo") for k in path) else a,
        _unbox(v["params"]))
    y = jax.jit(Stack(EncoderBlock, cfg, 2, final_norm=False).apply)(
        {"params": {k: p for k, p in params.items() if k != "final_norm"}}, _X, None,
        None, None)
    np.testing.assert_allclose(y, _X, atol=1e-6)

  def test_decoder_block_cross_attention_params_and_causality(self):
    enc = np.ones((2, 3, 8), np.float32)
    block = DecoderBlock(_CFG, cross_attention=True)
    v = jax.jit(block.init)(jax.random.key(0), _X, enc)
    self.assertEqual(set(v["params"]), {"attention_norm", "self_attention",
                                        "cross_attention_norm", "cross_attention",
                                        "mlp_norm", "mlp"})
    apply = jax.jit(block.apply)
    y = apply(v, _X, enc)
    later_changed = np.concatenate([_X[:, :3], np.full((2, 2, 8), 5.0, np.float32)], 1)
    y2 = apply(v, later_changed, enc)
    np.testing.assert_allclose(y[:, :3], y2[:, :3], atol=1e-6)
    self.assertGreater(np.abs(y[:, 3:] - y2[:, 3:]).max(), 1e-3)
    with self.assertRaisesRegex(ValueError, "encoded"):
      block.apply(v, _X)


class StackTest(chex.TestCase):

  @chex.variants(with_jit=True)
  def test_scan_and_remat_match_plain_loop(self):
    mask = np.ones((2, 1, 1, 5), bool)
    mask[0, ..., 3:] = False
    plain = Stack(EncoderBlock, _CFG, 2)
    v = _unbox(plain.init(jax.random.key(0), _X, mask, None, None))
    scanned_params = stack_layer_params(v)
    self.assertEqual(scanned_params["params"]["layers"]["mlp"]["wi"]["kernel"].shape,
                     (2, 8, 16))
    chex.assert_trees_all_equal(unstack_layer_params(scanned_params), v)

    def loss(module, params):
      return lambda p: jnp.sum(module.apply(p, _X, mask, None, None) ** 2)

    want, want_grad = self.variant(jax.value_and_grad(loss(plain, v)))(v)
    # (scan without remat is covered by the model tests.)
    for remat, scan in ((True, False), (True, True)):
      module = Stack(EncoderBlock, _CFG, 2, remat=remat, scan=scan)
      params = scanned_params if scan else v
      # The scanned init has the same structure as the converted plain params.
      init = _unbox(jax.eval_shape(module.init, jax.random.key(0), _X, mask, None, None))
      chex.assert_trees_all_equal_shapes(init, params)
      got, grad = self.variant(jax.value_and_grad(loss(module, params)))(params)
      np.testing.assert_allclose(got, want, rtol=1e-5)
      if scan:
        grad = unstack_layer_params(grad)
      chex.assert_trees_all_close(grad, want_grad, rtol=1e-4, atol=1e-5)

  def test_scanned_params_carry_layers_axis(self):
    module = Stack(EncoderBlock, _CFG, 2, scan=True)
    v = jax.eval_shape(module.init, jax.random.key(0), _X, None, None, None)
    names = v["params"]["layers"]["self_attention"]["qkv"]["kernel"].names
    self.assertEqual(names[0], "layers")
    # Converting boxed plain params gives the same names (and back).
    plain = jax.eval_shape(Stack(EncoderBlock, _CFG, 2).init, jax.random.key(0), _X,
                           None, None, None)
    converted = jax.eval_shape(stack_layer_params, plain)
    self.assertEqual(converted["params"]["layers"]["self_attention"]["qkv"]["kernel"].names,
                     names)
    back = jax.eval_shape(unstack_layer_params, converted)
    self.assertEqual(back["params"]["layers_1"]["mlp"]["wo"]["kernel"].names,
                     ("mlp", "embed"))

  def test_dropout_is_active_only_when_not_deterministic(self):
    cfg = BlockConfig(num_heads=2, mlp_dim=16, dropout_rate=0.5)
    plain = Stack(EncoderBlock, cfg, 1)
    v = jax.jit(plain.init)(jax.random.key(0), _X, None, None, None)
    outs = {}
    # remat must keep `deterministic` static (a traced bool would fail in Dropout).
    for remat in (False, True):
      module = Stack(EncoderBlock, cfg, 1, remat=remat)
      apply = jax.jit(module.apply, static_argnames="deterministic")
      a = apply(v, _X, None, None, None, deterministic=True)
      c = apply(v, _X, None, None, None, deterministic=False,
                rngs={"dropout": jax.random.key(1)})
      self.assertGreater(np.abs(a - c).max(), 1e-3)
      outs[remat] = (a, c)
    np.testing.assert_allclose(outs[True][0], outs[False][0], atol=1e-6)
    np.testing.assert_allclose(outs[True][1], outs[False][1], atol=1e-6)
