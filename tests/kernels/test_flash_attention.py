"""Flash attention kernel tests: one shared body, run per backend.

`FlashAttentionTestBase` holds every numerical test; each subclass names a
backend (Triton, Mosaic TPU) and runs it in Pallas interpret mode on the CPU
(on a GPU/TPU machine the same class can run compiled with INTERPRET = None).
References are float64 NumPy. Interpret mode is slow: tiny shapes, 8/16-row
tiles so that every case still has several tiles per axis.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

from kernels.flash_attention import BlockSizes
from kernels.flash_attention import flash_attention

TINY_TRITON = BlockSizes(block_q=16, block_k=16, block_q_dkv=16, block_k_dkv=16,
                         block_q_dq=16, block_k_dq=16)
# Mixed tile sizes exercise tile-range arithmetic where tiles differ per axis.
TINY_MOSAIC = BlockSizes(block_q=8, block_k=16, block_q_dkv=8, block_k_dkv=16,
                         block_q_dq=16, block_k_dq=8)


def _probs_np(q, k, *, is_causal=False, q_ids=None, kv_ids=None, scale=None):
  """Float64 attention weights [B, H, Lq, Lk] (zero rows where nothing is
  allowed) and the query-head -> kv-head map."""
  q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
  batch, q_len, num_heads, head_dim = q.shape
  kv_len, num_kv_heads = k.shape[1], k.shape[2]
  scale = 1.0 / np.sqrt(head_dim) if scale is None else scale
  heads = np.arange(num_heads) // (num_heads // num_kv_heads)
  logits = np.einsum("bqhd,bkhd->bhqk", q, k[:, :, heads]) * scale
  mask = np.ones((batch, 1, q_len, kv_len), bool)
  if is_causal:
    mask &= (np.arange(kv_len)[None, :]
             <= np.arange(q_len)[:, None] + kv_len - q_len)[None, None]
  if q_ids is not None:
    mask &= (np.asarray(q_ids)[:, None, :, None]
             == np.asarray(kv_ids)[:, None, None, :])
  logits = np.where(mask, logits, -np.inf)
  row_max = logits.max(-1, keepdims=True)
  weights = np.exp(logits - np.where(np.isfinite(row_max), row_max, 0.0))
  denom = weights.sum(-1, keepdims=True)
  return weights / np.where(denom == 0, 1.0, denom), heads, scale


def reference_np(q, k, v, **kwargs):
  """Float64 NumPy attention with the kernel's semantics -> [B, Lq, H, Dv]."""
  probs, heads, _ = _probs_np(q, k, **kwargs)
  return np.einsum("bhqk,bkhd->bqhd", probs,
                   np.asarray(v, np.float64)[:, :, heads])


def reference_grads_np(q, k, v, dout, **kwargs):
  """Float64 (dq, dk, dv) of sum(out * dout), derived by hand."""
  probs, heads, scale = _probs_np(q, k, **kwargs)
  q, k, v, dout = (np.asarray(x, np.float64) for x in (q, k, v, dout))
  num_kv_heads = k.shape[2]
  group = q.shape[2] // num_kv_heads
  v_h, k_h = v[:, :, heads], k[:, :, heads]
  dp = np.einsum("bqhd,bkhd->bhqk", dout, v_h)
  ds = probs * (dp - np.sum(dp * probs, axis=-1, keepdims=True))
  dq = scale * np.einsum("bhqk,bkhd->bqhd", ds, k_h)
  dk_h = scale * np.einsum("bhqk,bqhd->bkhd", ds, q)
  dv_h = np.einsum("bhqk,bqhd->bkhd", probs, dout)
  fold = lambda x: x.reshape(*x.shape[:2], num_kv_heads, group,  # noqa: E731
                             x.shape[-1]).sum(3)
  return dq, fold(dk_h), fold(dv_h)


def _inputs(seed, batch, q_len, kv_len, num_heads, num_kv_heads, head_dim,
            head_dim_v=None, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  head_dim_v = head_dim_v or head_dim
  shapes = ((batch, q_len, num_heads, head_dim),
            (batch, kv_len, num_kv_heads, head_dim),
            (batch, kv_len, num_kv_heads, head_dim_v),
            (batch, q_len, num_heads, head_dim_v))
  q, k, v, dout = (jnp.asarray(rng.normal(size=s), dtype) for s in shapes)
  return q, k, v, dout


# Forward tolerance per input dtype (gradients get 5x): bf16/fp16 errors come
# from the rounded P in the P @ V product, relative to the output's magnitude.
TOLERANCE = {jnp.dtype(jnp.bfloat16): 2e-2, jnp.dtype(jnp.float16): 2e-3}


class FlashAttentionTestBase(parameterized.TestCase):
  """Shared numerical tests; subclasses set the backend and tiles."""

  __test__ = False  # collected through the subclasses only
  BACKEND: str | None = None
  INTERPRET: bool | None = True
  BLOCKS = TINY_TRITON
  DTYPE = jnp.float32  # of the cases that name no dtype

  def attention(self, q, k, v, **kwargs):
    return flash_attention(q, k, v, block_sizes=self.BLOCKS,
                           interpret=self.INTERPRET, backend=self.BACKEND,
                           **kwargs)

  def check(self, *, seed=0, batch=1, q_len=37, kv_len=None, num_heads=2,
            num_kv_heads=None, head_dim=32, head_dim_v=None,
            dtype=None, is_causal=False, segments=None, grads=True,
            scale=None):
    kv_len = q_len if kv_len is None else kv_len
    dtype = dtype or self.DTYPE
    q, k, v, dout = _inputs(seed, batch, q_len, kv_len, num_heads,
                            num_kv_heads or num_heads, head_dim, head_dim_v,
                            dtype)
    q_ids = kv_ids = segment_ids = None
    if segments is not None:
      rng = np.random.default_rng(seed + 1)
      q_ids = np.sort(rng.integers(0, segments, (batch, q_len)), axis=1)
      kv_ids = (q_ids if kv_len == q_len else
                np.sort(rng.integers(0, segments, (batch, kv_len)), axis=1))
      segment_ids = (jnp.asarray(q_ids) if kv_len == q_len
                     else (jnp.asarray(q_ids), jnp.asarray(kv_ids)))
    kwargs = dict(is_causal=is_causal, segment_ids=segment_ids, scale=scale)
    ref_kwargs = dict(is_causal=is_causal, q_ids=q_ids, kv_ids=kv_ids,
                      scale=scale)
    tol = TOLERANCE.get(jnp.dtype(dtype), 2e-5)  # same rounded inputs
    if grads:
      f = jax.jit(lambda q, k, v: jax.vjp(
          lambda *a: self.attention(*a, **kwargs), q, k, v))
      out, vjp = f(q, k, v)
      got_grads = jax.jit(vjp)(dout)
    else:
      out = jax.jit(lambda q, k, v: self.attention(q, k, v, **kwargs))(q, k, v)
    self.assertEqual(out.dtype, dtype)
    self.assertEqual(out.shape, (batch, q_len, num_heads, v.shape[-1]))
    want = reference_np(q, k, v, **ref_kwargs)
    np.testing.assert_allclose(np.asarray(out, np.float64), want,
                               atol=tol * max(1.0, np.abs(want).max()),
                               rtol=tol)
    if grads:
      want_grads = reference_grads_np(q, k, v, dout, **ref_kwargs)
      for name, got, ref in zip(("dq", "dk", "dv"), got_grads, want_grads):
        self.assertEqual(got.dtype, dtype, name)
        scale_ = max(1.0, np.abs(ref).max())
        np.testing.assert_allclose(np.asarray(got, np.float64), ref,
                                   atol=5 * tol * scale_, rtol=5 * tol,
                                   err_msg=name)
    return out

  @chex.variants(with_jit=True, without_jit=True)
  def test_forward_matches_reference(self):
    q, k, v, _ = _inputs(0, 2, 21, 21, 2, 2, 32, dtype=self.DTYPE)
    out = self.variant(lambda q, k, v: self.attention(q, k, v,
                                                      is_causal=True))(q, k, v)
    tol = TOLERANCE.get(jnp.dtype(self.DTYPE), 2e-5)
    np.testing.assert_allclose(np.asarray(out, np.float64),
                               reference_np(q, k, v, is_causal=True),
                               atol=tol, rtol=tol)

  @parameterized.named_parameters(
      ("noncausal_gqa", dict(num_heads=4, num_kv_heads=2)),
      ("noncausal_exact_tiles", dict(q_len=32)),  # nothing to mask
      ("causal_gqa", dict(num_heads=4, num_kv_heads=2, is_causal=True)),
      ("causal_segments", dict(is_causal=True, segments=3, batch=2)),
  )
  def test_forward_and_grads(self, kwargs):
    self.check(**kwargs)

  @parameterized.named_parameters(
      ("decode_step", dict(q_len=1, kv_len=37)),
      ("chunked_prefill", dict(q_len=5, kv_len=37)),
      ("more_queries_than_keys", dict(q_len=37, kv_len=20)),  # zero rows
  )
  def test_causal_cross_lengths(self, kwargs):
    self.check(is_causal=True, **kwargs)

  def test_bfloat16(self):
    self.check(dtype=jnp.bfloat16, is_causal=True, num_heads=2)

  def test_value_head_dim_differs_and_scale(self):
    self.check(head_dim=32, head_dim_v=48, scale=0.3, grads=False)

  def test_rows_without_keys_are_zero_with_zero_grads(self):
    q, k, v, dout = _inputs(3, 1, 16, 16, 2, 2, 32, dtype=self.DTYPE)
    tol = TOLERANCE.get(jnp.dtype(self.DTYPE), 1e-6)
    q_ids = jnp.full((1, 16), 7, jnp.int32)
    kv_ids = jnp.arange(16, dtype=jnp.int32)[None]  # id 7 only at key 7
    q_ids = q_ids.at[:, :8].set(100)  # rows 0..7 match no key
    f = lambda q, k, v: self.attention(q, k, v, segment_ids=(q_ids, kv_ids))
    out, vjp = jax.vjp(f, q, k, v)
    np.testing.assert_array_equal(out[:, :8], 0.0)
    np.testing.assert_allclose(
        np.asarray(out[:, 8:], np.float64),
        np.broadcast_to(np.asarray(v[:, 7:8], np.float64), out[:, 8:].shape),
        atol=tol)
    dq, dk, dv = vjp(dout)
    self.assertTrue(np.all(np.isfinite(dq)) and np.all(np.isfinite(dk)))
    np.testing.assert_allclose(np.asarray(dq, np.float64), 0.0,
                               atol=10 * tol)  # one key: no dq
    np.testing.assert_array_equal(np.delete(np.asarray(dv), 7, axis=1), 0.0)

  @pytest.mark.slow
  def test_slow_cases(self):
    cases = {
        "len1": dict(q_len=1),
        "len130_causal": dict(q_len=130, is_causal=True),
        "len130_segments_gqa": dict(q_len=130, segments=4, num_heads=4,
                                    num_kv_heads=1),
        "bf16_cross_gqa": dict(q_len=20, kv_len=45, num_heads=4,
                               num_kv_heads=2, dtype=jnp.bfloat16,
                               is_causal=True),
        "fp32_head_dim_256": dict(q_len=24, head_dim=256, grads=False),
    }
    for name, kwargs in cases.items():
      with self.subTest(name):
        self.check(**kwargs)


class TritonInterpretTest(FlashAttentionTestBase):
  __test__ = True
  BACKEND = "triton"
  BLOCKS = TINY_TRITON

  def test_segments_unaligned_cross_lengths_gqa(self):
    # Sorted ids: most tile pairs share no segment and are skipped.
    self.check(batch=2, q_len=45, kv_len=29, num_heads=4, num_kv_heads=2,
               segments=4)

  def test_tiles_without_a_shared_segment_are_never_read(self):
    """Key tile 1 holds only segment 9, which no query has: the forward, dQ
    and dK/dV kernels skip it (from the per-tile id bounds), so NaNs there
    never reach a product (a masked product would give 0 * NaN = NaN)."""
    q, k, v, dout = _inputs(4, 1, 40, 48, 2, 1, 32)
    q_ids = np.repeat([[0, 1]], 20, axis=1)
    kv_ids = np.repeat([[0, 9, 1]], 16, axis=1)
    poisoned = (k.at[:, 16:32].set(jnp.nan), v.at[:, 16:32].set(jnp.nan))
    ids = (jnp.asarray(q_ids), jnp.asarray(kv_ids))
    out, vjp = jax.vjp(lambda *a: self.attention(*a, segment_ids=ids),
                       q, *poisoned)
    ref_kwargs = dict(q_ids=q_ids, kv_ids=kv_ids)
    np.testing.assert_allclose(out, reference_np(q, k, v, **ref_kwargs),
                               atol=2e-5, rtol=2e-5)
    for name, got, want in zip(("dq", "dk", "dv"), vjp(dout),
                               reference_grads_np(q, k, v, dout, **ref_kwargs)):
      np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4,
                                 err_msg=name)


class MosaicInterpretTest(FlashAttentionTestBase):
  __test__ = True
  BACKEND = "mosaic"
  BLOCKS = TINY_MOSAIC


class DefaultDispatchTest(parameterized.TestCase):
  """backend=None, interpret=None: platform dispatch picks interpret on CPU."""

  def test_default_tiles_and_dispatch(self):
    q, k, v, dout = _inputs(5, 1, 40, 40, 2, 1, 64)
    out, vjp = jax.jit(lambda *a: jax.vjp(
        lambda *b: flash_attention(*b, is_causal=True), *a))(q, k, v)
    np.testing.assert_allclose(out, reference_np(q, k, v, is_causal=True),
                               atol=2e-5, rtol=2e-5)
    for got, want in zip(jax.jit(vjp)(dout),
                         reference_grads_np(q, k, v, dout, is_causal=True)):
      np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
