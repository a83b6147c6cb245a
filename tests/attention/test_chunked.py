"""The chunked (flash) path: block skipping, O(N·block) memory, edge cases."""

from __future__ import annotations

from absl.testing import parameterized
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxformer.attention import chunked as chunked_lib
from jaxformer.attention import chunked_attention

import attention_reference as ref


def _qkv(b, lq, lk, h, hkv, d, dv, seed=0):
  rng = np.random.default_rng(seed)
  f = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)
  return f(b, lq, h, d), f(b, lk, hkv, d), f(b, lk, hkv, dv), rng.normal(size=(b, lq, h, dv))


def _config(bq, bk, lq, lk, causal=True):
  return chunked_lib._Config(is_causal=causal, scale=1.0, block_q=bq, block_k=bk,
                             q_len=lq, kv_len=lk, num_q_blocks=-(-lq // bq),
                             num_k_blocks=-(-lk // bk))


def _max_intermediate_size(jaxpr) -> int:
  """Largest number of elements of any value produced anywhere in ``jaxpr``."""
  best = 0
  for eqn in jaxpr.eqns:
    for var in eqn.outvars:
      best = max(best, int(np.prod(getattr(var.aval, "shape", ()))))
    for param in eqn.params.values():
      subs = param if isinstance(param, (tuple, list)) else (param,)
      for sub in subs:
        if isinstance(sub, jax.extend.core.ClosedJaxpr):
          best = max(best, _max_intermediate_size(sub.jaxpr))
        elif isinstance(sub, jax.extend.core.Jaxpr):
          best = max(best, _max_intermediate_size(sub))
  return best


class ChunkedTest(chex.TestCase, parameterized.TestCase):

  @parameterized.parameters((16, 32, 77, 77), (32, 16, 50, 130), (16, 16, 130, 40),
                            (8, 24, 33, 100), (64, 64, 64, 64))
  def test_causal_block_ranges_are_exact(self, bq, bk, lq, lk):
    """Each query block visits exactly the key blocks holding an allowed key."""
    cfg = _config(bq, bk, lq, lk)
    allowed = ref.allowed_mask(1, 1, lq, lk, is_causal=True)[0, 0]
    for i in range(cfg.num_q_blocks):
      needed = [j for j in range(cfg.num_k_blocks)
                if allowed[i * bq:(i + 1) * bq, j * bk:(j + 1) * bk].any()]
      hi = int(chunked_lib._num_k_blocks_for(cfg, jnp.int32(i)))
      self.assertEqual(list(range(hi)), needed or list(range(hi)), (i, hi, needed))
      if not needed:
        self.assertEqual(hi, 0)
    for j in range(cfg.num_k_blocks):
      users = [i for i in range(cfg.num_q_blocks)
               if allowed[i * bq:(i + 1) * bq, j * bk:(j + 1) * bk].any()]
      lo = int(chunked_lib._first_q_block_for(cfg, jnp.int32(j)))
      self.assertEqual(lo, users[0] if users else cfg.num_q_blocks)

  def test_memory_is_linear_in_length(self):
    """No N x N value anywhere in the forward + backward computation."""
    length, block = 1024, 64
    q, k, v, _ = _qkv(1, length, length, 2, 1, 8, 8)
    loss = lambda q, k, v: jnp.sum(chunked_attention(q, k, v, is_causal=True,
                                                     block_q=block, block_k=block))
    jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)
    biggest = _max_intermediate_size(jaxpr.jaxpr)
    self.assertLess(biggest, length * length // 16)
    self.assertGreaterEqual(biggest, length * 2 * 8)   # sanity: the walker sees arrays

  @chex.variants(with_jit=True, without_jit=True)
  def test_fully_masked_rows_and_long_queries(self):
    """Lq > Lk causal: the first Lq - Lk queries see nothing -> zeros, finite grads."""
    q, k, v, d_out = _qkv(1, 45, 20, 2, 2, 8, 4)

    def loss(q, k, v):
      out = chunked_attention(q, k, v, is_causal=True, block_q=16, block_k=8)
      return jnp.sum(out * d_out.astype(np.float32)), out

    (_, out), grads = self.variant(jax.value_and_grad(loss, (0, 1, 2), has_aux=True))(
        q, k, v)
    want, _, want_grads = ref.attention(q, k, v, is_causal=True, d_out=d_out)
    np.testing.assert_array_equal(out[:, :25], 0.0)
    np.testing.assert_allclose(out, want, atol=2e-5, rtol=2e-4)
    for got, w in zip(grads, want_grads):
      self.assertTrue(np.all(np.isfinite(got)))
      np.testing.assert_allclose(got, w, atol=2e-5, rtol=2e-4)

  @parameterized.named_parameters(
      ("full", (2, 4, 45, 70), True),
      ("padding", (2, 1, 1, 70), False),
      ("per_query", (1, 1, 45, 1), True),
  )
  def test_explicit_mask(self, mask_shape, causal):
    q, k, v, d_out = _qkv(2, 45, 70, 4, 2, 8, 6)
    mask = np.random.default_rng(3).random(mask_shape) < 0.6
    seg = np.random.default_rng(4)
    q_seg, kv_seg = seg.integers(0, 2, (2, 45)), seg.integers(0, 2, (2, 70))

    def loss(q, k, v):
      out = chunked_attention(q, k, v, is_causal=causal, mask=jnp.asarray(mask),
                              q_segment_ids=jnp.asarray(q_seg),
                              kv_segment_ids=jnp.asarray(kv_seg), block_q=16, block_k=32)
      return jnp.sum(out * d_out.astype(np.float32)), out

    (_, out), grads = jax.jit(jax.value_and_grad(loss, (0, 1, 2), has_aux=True))(q, k, v)
    want, _, want_grads = ref.attention(q, k, v, mask=mask, is_causal=causal, q_seg=q_seg,
                                        kv_seg=kv_seg, d_out=d_out)
    np.testing.assert_allclose(out, want, atol=2e-5, rtol=2e-4)
    for got, w in zip(grads, want_grads):
      np.testing.assert_allclose(got, w, atol=2e-5, rtol=2e-4)

  def test_bfloat16_gradients(self):
    q, k, v, d_out = _qkv(1, 40, 40, 4, 2, 8, 8)
    f = lambda q, k, v: jnp.sum(chunked_attention(q, k, v, is_causal=True, block_q=16,
                                                  block_k=16).astype(jnp.float32) * d_out)
    bf = lambda x: x.astype(jnp.bfloat16)
    grads = jax.jit(jax.grad(f, (0, 1, 2)))(bf(q), bf(k), bf(v))
    _, _, want = ref.attention(bf(q).astype(jnp.float32), bf(k).astype(jnp.float32),
                               bf(v).astype(jnp.float32), is_causal=True, d_out=d_out)
    for got, w in zip(grads, want):
      self.assertEqual(got.dtype, jnp.bfloat16)
      err = np.linalg.norm(np.asarray(got, np.float64) - w) / np.linalg.norm(w)
      self.assertLess(err, 2e-2)

  def test_bad_arguments(self):
    q, k, v, _ = _qkv(1, 8, 8, 2, 2, 4, 4)
    with pytest.raises(ValueError, match="block_q=0"):
      chunked_attention(q, k, v, block_q=0)
    with pytest.raises(ValueError, match="both q_segment_ids and kv_segment_ids"):
      chunked_attention(q, k, v, q_segment_ids=jnp.zeros((1, 8), jnp.int32))
