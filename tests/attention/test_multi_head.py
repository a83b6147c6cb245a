"""MultiHeadAttention: parameters, math against the reference, KV cache, dropout, RoPE."""

from __future__ import annotations

from absl.testing import parameterized
import chex
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxformer import axes
from jaxformer.attention import MultiHeadAttention, apply_rotary_embedding

import attention_reference as ref

ATOL = 2e-5


def _inputs(shape, seed=0):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def _boxed_names(params):
  """{path: logical names} of every partitioned parameter."""
  flat = flax.traverse_util.flatten_dict(params, sep="/",
                                         is_leaf=lambda _, x: isinstance(x, nn.Partitioned))
  return {k: v.names for k, v in flat.items()}


class ParamsTest(parameterized.TestCase):

  def test_self_attention_has_one_fused_qkv_kernel(self):
    mha = MultiHeadAttention(num_heads=2, head_dim=8)
    variables = mha.init(jax.random.key(0), jnp.ones((1, 3, 12)))
    names = _boxed_names(variables["params"])
    self.assertEqual(names, {
        "qkv/kernel": (axes.EMBED, axes.QKV, axes.HEADS, axes.HEAD_DIM),
        "qkv/bias": (axes.QKV, axes.HEADS, axes.HEAD_DIM),
        "out/kernel": (axes.HEADS, axes.HEAD_DIM, axes.EMBED),
        "out/bias": (axes.EMBED,),
    })
    params = nn.unbox(variables["params"])
    self.assertEqual(params["qkv"]["kernel"].shape, (12, 3, 2, 8))
    self.assertEqual(params["out"]["kernel"].shape, (2, 8, 12))

  def test_gqa_fused_kernel_groups_query_heads_with_their_kv_head(self):
    mha = MultiHeadAttention(num_heads=4, num_kv_heads=2, head_dim=8, use_bias=False)
    variables = mha.init(jax.random.key(0), jnp.ones((1, 3, 12)))
    names = _boxed_names(variables["params"])
    self.assertEqual(names["qkv/kernel"],
                     (axes.EMBED, axes.KV_HEADS, axes.QKV, axes.HEAD_DIM))
    self.assertEqual(nn.unbox(variables["params"])["qkv"]["kernel"].shape, (12, 2, 4, 8))
    self.assertNotIn("qkv/bias", names)

  def test_cross_attention_params(self):
    mha = MultiHeadAttention(num_heads=4, num_kv_heads=2, head_dim=8, out_features=5)
    variables = mha.init(jax.random.key(0), jnp.ones((1, 3, 12)), jnp.ones((1, 6, 10)))
    params = nn.unbox(variables["params"])
    self.assertEqual(sorted(params), ["kv", "out", "query"])
    self.assertEqual(params["query"]["kernel"].shape, (12, 4, 8))
    self.assertEqual(params["kv"]["kernel"].shape, (10, 2, 2, 8))
    self.assertEqual(params["out"]["kernel"].shape, (4, 8, 5))
    self.assertEqual(_boxed_names(variables["params"])["kv/kernel"],
                     (axes.EMBED, axes.QKV, axes.KV_HEADS, axes.HEAD_DIM))

  def test_fused_blocks_initialised_like_separate_projections(self):
    mha = MultiHeadAttention(num_heads=4, head_dim=16)
    kernel = nn.unbox(mha.init(jax.random.key(0), jnp.ones((1, 2, 64)))["params"]
                      )["qkv"]["kernel"]
    # xavier_uniform of a [64, 64] projection: bound sqrt(6 / 128).
    bound = np.sqrt(6.0 / 128)
    self.assertLessEqual(float(jnp.abs(kernel).max()), bound)
    self.assertGreater(float(jnp.abs(kernel).max()), 0.9 * bound)
    self.assertFalse(np.allclose(kernel[:, 0], kernel[:, 1]))

  def test_out_kernel_init_only_changes_the_output_projection(self):
    x = jnp.ones((1, 2, 64))
    base = dict(num_heads=4, kernel_init=nn.initializers.normal(0.02))
    default = nn.unbox(MultiHeadAttention(**base).init(jax.random.key(0), x)["params"])
    same = nn.unbox(MultiHeadAttention(
        **base, out_kernel_init=nn.initializers.normal(0.02)).init(
            jax.random.key(0), x)["params"])
    chex.assert_trees_all_equal(default, same)   # None = kernel_init, same keys
    scaled = nn.unbox(MultiHeadAttention(
        **base, out_kernel_init=nn.initializers.normal(0.005)).init(
            jax.random.key(0), x)["params"])
    np.testing.assert_array_equal(scaled["qkv"]["kernel"], default["qkv"]["kernel"])
    out = np.asarray(scaled["out"]["kernel"], np.float64)
    self.assertEqual(out.shape, (4, 16, 64))
    # 4096 normal samples: the sample std is within ~1.1% (1 sigma) of 0.005.
    self.assertAlmostEqual(out.std() / 0.005, 1.0, delta=0.06)
    self.assertAlmostEqual(np.asarray(default["out"]["kernel"]).std() / 0.02, 1.0,
                           delta=0.06)


class MathTest(chex.TestCase, parameterized.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(("mha", 2), ("gqa", 1))
  def test_self_attention_matches_reference(self, kv_heads):
    x = _inputs((2, 7, 12))
    mha = MultiHeadAttention(num_heads=2, num_kv_heads=kv_heads, head_dim=8)
    params = mha.init(jax.random.key(1), x)["params"]
    # Non-zero biases so that they are checked too.
    params = jax.tree.map(lambda p: p + 0.1, nn.unbox(params))
    out = self.variant(lambda p, x: mha.apply({"params": p}, x, is_causal=True))(params, x)

    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    xn = np.asarray(x, np.float64)
    qkv = np.einsum("ble,e...->bl...", xn, p["qkv"]["kernel"]) + p["qkv"]["bias"]
    if kv_heads == 2:       # [B, L, 3, H, D]
      q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    else:                   # [B, L, Hkv, G + 2, D]
      q = qkv[:, :, :, :2].reshape(2, 7, 2, 8)
      k, v = qkv[:, :, :, 2], qkv[:, :, :, 3]
    att, _ = ref.attention(q, k, v, is_causal=True)
    want = np.einsum("blhd,hdo->blo", att, p["out"]["kernel"]) + p["out"]["bias"]
    np.testing.assert_allclose(out, want, atol=1e-4, rtol=1e-4)

  @chex.variants(with_jit=True, without_jit=True)
  def test_cross_attention_matches_reference(self):
    x, y = _inputs((2, 5, 12)), _inputs((2, 9, 6), seed=1)
    mha = MultiHeadAttention(num_heads=4, num_kv_heads=2, head_dim=8, use_bias=False)
    params = nn.unbox(mha.init(jax.random.key(1), x, y)["params"])
    out = self.variant(lambda p, x, y: mha.apply({"params": p}, x, y))(params, x, y)
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    q = np.einsum("ble,ehd->blhd", x, p["query"]["kernel"])
    kv = np.einsum("ble,e...->bl...", y, p["kv"]["kernel"])
    att, _ = ref.attention(q, kv[:, :, 0], kv[:, :, 1])
    want = np.einsum("blhd,hdo->blo", att, p["out"]["kernel"])
    np.testing.assert_allclose(out, want, atol=1e-4, rtol=1e-4)

  def test_return_weights_sum_to_one_and_are_sown(self):
    x = _inputs((2, 6, 12))
    mha = MultiHeadAttention(num_heads=2, head_dim=8)
    variables = mha.init(jax.random.key(0), x)
    (out, w), state = mha.apply(variables, x, is_causal=True, return_weights=True,
                                mutable=["intermediates"])
    self.assertEqual(out.shape, (2, 6, 12))
    self.assertEqual(w.shape, (2, 2, 6, 6))
    np.testing.assert_allclose(w.sum(-1), 1.0, atol=1e-5)
    self.assertTrue(np.all(np.triu(np.asarray(w), k=1) == 0))   # causal
    (sown,) = state["intermediates"]["attention_weights"]
    np.testing.assert_array_equal(sown, w)
    plain = mha.apply(variables, x, is_causal=True)
    np.testing.assert_allclose(out, plain, atol=1e-6)

  def test_chunked_implementation_matches_xla(self):
    x = _inputs((1, 40, 12))
    seg = jnp.asarray(np.repeat([[1, 2]], 20, axis=1))
    ids = dict(is_causal=True, segment_ids=seg)
    xla = MultiHeadAttention(num_heads=2, head_dim=8, implementation="xla")
    chunked = MultiHeadAttention(num_heads=2, head_dim=8, implementation="chunked")
    variables = xla.init(jax.random.key(0), x)
    np.testing.assert_allclose(chunked.apply(variables, x, **ids),
                               xla.apply(variables, x, **ids), atol=1e-5)

  def test_causality_through_gradients(self):
    x = _inputs((1, 6, 12))
    mha = MultiHeadAttention(num_heads=2, head_dim=8, rotary_base=100.0)
    variables = mha.init(jax.random.key(0), x)
    jac = jax.jit(jax.grad(lambda x: mha.apply(variables, x, is_causal=True)[0, 3].sum()))(x)
    self.assertTrue(np.all(np.asarray(jac[0, 4:]) == 0))
    self.assertTrue(np.all(np.abs(np.asarray(jac[0, :4])).sum(-1) > 0))

  def test_dropout(self):
    x = _inputs((2, 6, 12))
    mha = MultiHeadAttention(num_heads=2, head_dim=8, dropout_rate=0.5,
                             implementation="chunked")
    plain = MultiHeadAttention(num_heads=2, head_dim=8)
    variables = mha.init(jax.random.key(0), x)
    det = mha.apply(variables, x, deterministic=True)
    np.testing.assert_allclose(det, plain.apply(variables, x), atol=1e-6)
    drop = lambda seed: mha.apply(variables, x, deterministic=False,
                                  rngs={"dropout": jax.random.key(seed)})
    a, b = drop(0), drop(1)
    self.assertFalse(np.allclose(a, det, atol=1e-3))
    self.assertFalse(np.allclose(a, b, atol=1e-3))
    np.testing.assert_array_equal(a, drop(0))
    with pytest.raises(Exception, match="dropout"):
      mha.apply(variables, x, deterministic=False)   # no rng given


class DecodeTest(chex.TestCase, parameterized.TestCase):

  @parameterized.named_parameters(
      ("mha", dict(num_heads=2)),
      ("gqa_rope", dict(num_heads=4, num_kv_heads=2, rotary_base=10000.0)),
  )
  def test_step_by_step_equals_full_causal_pass(self, kwargs):
    batch, length, features = 2, 7, 16
    x = _inputs((batch, length, features))
    full = MultiHeadAttention(head_dim=8, **kwargs)
    dec = MultiHeadAttention(head_dim=8, decode=True, **kwargs)
    params = full.init(jax.random.key(0), x)["params"]
    want = full.apply({"params": params}, x, is_causal=True)

    cache = dec.init(jax.random.key(0), x)["cache"]
    self.assertEqual(cache["cached_key"].shape, (batch, length, kwargs.get(
        "num_kv_heads", kwargs["num_heads"]), 8))

    @jax.jit
    def step(cache, x_chunk):
      out, state = dec.apply({"params": params, "cache": cache}, x_chunk, mutable=["cache"])
      return out, state["cache"]

    outs = []
    # A prefill of 3 tokens, then one token at a time; the index is traced under jit.
    for start, stop in [(0, 3)] + [(i, i + 1) for i in range(3, length)]:
      out, cache = step(cache, x[:, start:stop])
      outs.append(out)
    self.assertEqual(int(cache["cache_index"]), length)
    np.testing.assert_allclose(jnp.concatenate(outs, axis=1), want, atol=1e-5, rtol=1e-5)

  def test_decode_cross_attention_ignores_cache(self):
    x, y = _inputs((1, 3, 12)), _inputs((1, 5, 12))
    dec = MultiHeadAttention(num_heads=2, decode=True)
    variables = dec.init(jax.random.key(0), x, y)
    self.assertNotIn("cache", variables)
    plain = MultiHeadAttention(num_heads=2)
    np.testing.assert_allclose(dec.apply(variables, x, y), plain.apply(variables, x, y),
                               atol=1e-6)


class RotaryTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_matches_numpy_and_is_relative(self):
    x = _inputs((2, 5, 3, 8))
    pos = jnp.asarray(np.array([[0, 1, 2, 3, 4], [7, 9, 11, 13, 15]]))
    got = self.variant(apply_rotary_embedding)(x, pos)
    xn = np.asarray(x, np.float64)
    freq = 10000.0 ** (-np.arange(4) * 2.0 / 8)
    ang = np.asarray(pos, np.float64)[:, :, None, None] * freq
    x1, x2 = xn[..., :4], xn[..., 4:]
    want = np.concatenate([x1 * np.cos(ang) - x2 * np.sin(ang),
                           x2 * np.cos(ang) + x1 * np.sin(ang)], -1)
    np.testing.assert_allclose(got, want, atol=1e-5)
    # q_m . k_n depends on m - n only.
    q, k = x[:1, :1], x[:1, 1:2]
    dot = lambda m, n: float(jnp.sum(
        apply_rotary_embedding(q, jnp.array([[m]])) * apply_rotary_embedding(
            k, jnp.array([[n]]))))
    self.assertAlmostEqual(dot(5, 2), dot(13, 10), places=4)

  def test_odd_head_dim_raises(self):
    with pytest.raises(ValueError, match="head_dim=7 must be even"):
      apply_rotary_embedding(jnp.ones((1, 2, 1, 7)), jnp.zeros((1, 2)))


class ValidationTest(parameterized.TestCase):

  def test_features_not_divisible(self):
    with pytest.raises(ValueError, match="features=10 is not divisible by num_heads=4"):
      MultiHeadAttention(num_heads=4).init(jax.random.key(0), jnp.ones((1, 2, 10)))

  def test_bad_gqa(self):
    with pytest.raises(ValueError, match="num_heads=4 must be a positive multiple of "
                       "num_kv_heads=3"):
      MultiHeadAttention(num_heads=4, num_kv_heads=3, head_dim=4).init(
          jax.random.key(0), jnp.ones((1, 2, 8)))

  def test_bad_positions(self):
    with pytest.raises(ValueError, match="positions must be"):
      MultiHeadAttention(num_heads=2, rotary_base=1e4).init(
          jax.random.key(0), jnp.ones((1, 3, 8)), positions=jnp.zeros((1, 4)))


class ValueHeadDimTest(chex.TestCase, parameterized.TestCase):
  """d_v != d_qk: the fused kernels stay one matrix, concatenated on the last axis."""

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(("mha", 2), ("gqa", 1))
  def test_self_attention_matches_reference(self, kv_heads):
    x = _inputs((2, 7, 12))
    mha = MultiHeadAttention(num_heads=2, num_kv_heads=kv_heads, head_dim=8,
                             value_head_dim=4)
    variables = mha.init(jax.random.key(1), x)
    groups = 2 // kv_heads
    names = _boxed_names(variables["params"])
    self.assertEqual(names["qkv/kernel"][2], axes.HEAD_DIM)
    params = jax.tree.map(lambda p: p + 0.1, nn.unbox(variables["params"]))
    self.assertEqual(params["qkv"]["kernel"].shape, (12, kv_heads, groups * 8 + 8 + 4))
    self.assertEqual(params["out"]["kernel"].shape, (2, 4, 12))
    out = self.variant(lambda p, x: mha.apply({"params": p}, x, is_causal=True))(params, x)

    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    qkv = np.einsum("ble,ekf->blkf", np.asarray(x, np.float64), p["qkv"]["kernel"])
    qkv = qkv + p["qkv"]["bias"]
    q = qkv[..., :groups * 8].reshape(2, 7, 2, 8)
    k, v = qkv[..., groups * 8:groups * 8 + 8], qkv[..., groups * 8 + 8:]
    att, _ = ref.attention(q, k, v, is_causal=True)
    want = np.einsum("blhd,hdo->blo", att, p["out"]["kernel"]) + p["out"]["bias"]
    np.testing.assert_allclose(out, want, atol=1e-4, rtol=1e-4)

  def test_cross_attention_and_decoding(self):
    x, y = _inputs((2, 5, 12)), _inputs((2, 9, 6), seed=1)
    mha = MultiHeadAttention(num_heads=4, num_kv_heads=2, head_dim=8, value_head_dim=6,
                             use_bias=False)
    params = nn.unbox(mha.init(jax.random.key(1), x, y)["params"])
    self.assertEqual(params["kv"]["kernel"].shape, (6, 2, 8 + 6))
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    q = np.einsum("ble,ehd->blhd", x, p["query"]["kernel"])
    kv = np.einsum("ble,ekf->blkf", y, p["kv"]["kernel"])
    att, _ = ref.attention(q, kv[..., :8], kv[..., 8:])
    want = np.einsum("blhd,hdo->blo", att, p["out"]["kernel"])
    np.testing.assert_allclose(mha.apply({"params": params}, x, y), want, atol=1e-4,
                               rtol=1e-4)
    # The KV cache holds values of width Dv.
    dec = MultiHeadAttention(num_heads=2, head_dim=8, value_head_dim=4, decode=True)
    cache = dec.init(jax.random.key(0), x)["cache"]
    self.assertEqual(cache["cached_value"].shape, (2, 5, 2, 4))


class BiasFlagsTest(parameterized.TestCase):

  @parameterized.parameters((False, True), (True, False), (None, None))
  def test_qkv_and_out_bias_are_separate(self, qkv_bias, out_bias):
    """The NYU notes: no bias on W_q/W_k/W_v, a bias on W_h (qkv_bias=False)."""
    for y in (None, jnp.ones((1, 4, 12))):
      mha = MultiHeadAttention(num_heads=2, qkv_bias=qkv_bias, out_bias=out_bias,
                               use_bias=True)
      params = nn.unbox(mha.init(jax.random.key(0), jnp.ones((1, 3, 12)), y)["params"])
      has = {name for name, p in params.items() if "bias" in p}
      want_qkv = True if qkv_bias is None else qkv_bias
      want_out = True if out_bias is None else out_bias
      self.assertEqual("out" in has, want_out)
      self.assertEqual(bool(has - {"out"}), want_qkv)


class KVCacheOverflowTest(parameterized.TestCase):
  """Decoding past the cache: an error when the index is known, else NaN (never clamped)."""

  def _setup(self):
    x = _inputs((1, 6, 8))
    dec = MultiHeadAttention(num_heads=2, decode=True)
    variables = dec.init(jax.random.key(0), x[:, :4])          # a cache of 4 slots
    want = MultiHeadAttention(num_heads=2).apply(
        {"params": variables["params"]}, x, is_causal=True)
    return x, dec, variables, want

  def test_eager_overflow_raises(self):
    x, dec, variables, want = self._setup()
    cache = variables["cache"]
    for t in range(4):
      out, state = dec.apply({**variables, "cache": cache}, x[:, t:t + 1],
                             mutable=["cache"])
      cache = state["cache"]
      np.testing.assert_allclose(out[:, 0], want[:, t], atol=1e-5)
    with pytest.raises(ValueError, match="cache index 4 overflows the KV cache of "
                       "max_len=4"):
      dec.apply({**variables, "cache": cache}, x[:, 4:5], mutable=["cache"])
    with pytest.raises(ValueError, match="5 tokens in one decoding call"):
      dec.apply(variables, x[:, :5], mutable=["cache"])

  def test_traced_overflow_gives_nan(self):
    x, dec, variables, want = self._setup()
    step = jax.jit(lambda c, x_t: dec.apply({**variables, "cache": c}, x_t,
                                            mutable=["cache"]))
    cache, outs = variables["cache"], []
    for t in range(6):
      out, state = step(cache, x[:, t:t + 1])
      cache = state["cache"]
      outs.append(out[:, 0])
    np.testing.assert_allclose(np.stack(outs[:4], 1), want[:, :4], atol=1e-5)
    self.assertTrue(np.isnan(np.stack(outs[4:])).all())
    # A chunk that only partly fits is NaN throughout (its write would be clamped).
    cache = variables["cache"]
    _, state = step(cache, x[:, 0:1])
    chunk = jax.jit(lambda c, x_t: dec.apply({**variables, "cache": c}, x_t,
                                             mutable=["cache"]))
    out, _ = chunk(state["cache"], x[:, 1:5])
    self.assertTrue(np.isnan(np.asarray(out)).all())

  def test_zero_kv_heads_raises(self):
    with pytest.raises(ValueError, match="num_kv_heads=0: expected a positive int"):
      MultiHeadAttention(num_heads=2, num_kv_heads=0).init(jax.random.key(0),
                                                           jnp.ones((1, 2, 8)))

