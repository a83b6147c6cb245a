"""Logits processors and sampling, checked against float64 NumPy references."""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import parameterized

from jaxformer.generation import sampling


def _softmax64(x_BV):
  x_BV = np.asarray(x_BV, np.float64)
  finite = np.isfinite(x_BV)
  m_B1 = np.max(np.where(finite, x_BV, -np.inf), axis=-1, keepdims=True)
  e_BV = np.where(finite, np.exp(x_BV - m_B1), 0.0)
  return e_BV / e_BV.sum(-1, keepdims=True)


def _ref_top_k_keep(logits_BV, k):
  """Keeps the k largest per row; ties to the lower index (stable sort of -logits)."""
  x_BV = np.asarray(logits_BV, np.float64)
  order_BV = np.argsort(-x_BV, axis=-1, kind="stable")
  keep_BV = np.zeros(x_BV.shape, bool)
  for b in range(x_BV.shape[0]):
    keep_BV[b, order_BV[b, :k]] = True
  return keep_BV


def _ref_top_p_keep(logits_BV, p):
  """Smallest prefix of the sorted distribution whose mass is >= p."""
  probs_BV = _softmax64(logits_BV)
  keep_BV = np.zeros(probs_BV.shape, bool)
  for b in range(probs_BV.shape[0]):
    order = np.argsort(-probs_BV[b], kind="stable")
    total = 0.0
    for i in order:
      keep_BV[b, i] = True
      total += probs_BV[b, i]
      if total >= p:
        break
  return keep_BV


def _distinct_logits(seed, shape):
  """Random logits with well-separated values (no near-ties at the cut-offs)."""
  rng = np.random.default_rng(seed)
  b, v = shape
  base = np.stack([rng.permutation(v) for _ in range(b)]).astype(np.float64)
  return (base * 0.37 + rng.uniform(0, 0.05, size=shape)).astype(np.float32)


class ProcessorsTest(chex.TestCase, parameterized.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_greedy_is_argmax(self):
    logits = _distinct_logits(0, (4, 11))
    out = self.variant(sampling.greedy)(logits)
    np.testing.assert_array_equal(np.asarray(out), np.argmax(logits, -1))
    self.assertEqual(out.dtype, jnp.int32)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(0.5, 1.0, 2.0)
  def test_temperature(self, temperature):
    logits = _distinct_logits(1, (3, 7))
    fn = self.variant(functools.partial(sampling.apply_temperature, temperature=temperature))
    out = fn(logits)
    np.testing.assert_allclose(
        _softmax64(np.asarray(out)), _softmax64(logits.astype(np.float64) / temperature),
        rtol=1e-5, atol=1e-7)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(1, 3, 7, 50)
  def test_top_k(self, k):
    logits = _distinct_logits(2, (5, 13))
    out = self.variant(functools.partial(sampling.top_k_filter, top_k=k))(logits)
    keep = _ref_top_k_keep(logits, min(k, 13))
    np.testing.assert_array_equal(np.isfinite(np.asarray(out)), keep)
    np.testing.assert_array_equal(np.asarray(out)[keep], logits[keep])
    # Renormalised distribution over the kept tokens.
    ref = _softmax64(np.where(keep, logits, -np.inf))
    np.testing.assert_allclose(jax.nn.softmax(out, -1), ref, rtol=1e-5, atol=1e-7)

  def test_top_k_exact_count_with_ties(self):
    logits = jnp.asarray([[1.0, 2.0, 2.0, 2.0, 0.0]])
    out = sampling.top_k_filter(logits, 2)
    np.testing.assert_array_equal(np.isfinite(np.asarray(out)),
                                  [[False, True, True, False, False]])

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(0.05, 0.3, 0.6, 0.9, 0.999, 1.0)
  def test_top_p(self, p):
    logits = _distinct_logits(3, (6, 9)) * 2.0
    out = self.variant(functools.partial(sampling.top_p_filter, top_p=p))(logits)
    keep = _ref_top_p_keep(logits, p)
    np.testing.assert_array_equal(np.isfinite(np.asarray(out)), keep)
    ref = _softmax64(np.where(keep, logits, -np.inf))
    np.testing.assert_allclose(jax.nn.softmax(out, -1), ref, rtol=1e-5, atol=1e-7)
    # The kept set is the smallest one reaching p: dropping its least likely member
    # falls below p.
    probs = _softmax64(logits)
    for b in range(logits.shape[0]):
      kept = np.sort(probs[b][keep[b]])
      self.assertGreaterEqual(kept.sum(), min(p, 1.0) - 1e-12)
      if p < 1.0:
        self.assertLess(kept[1:].sum(), p)

  @chex.variants(with_jit=True, without_jit=True)
  def test_top_p_traced(self):
    logits = _distinct_logits(4, (3, 8)) * 2.0
    out = self.variant(sampling.top_p_filter)(logits, jnp.float32(0.5))
    np.testing.assert_array_equal(np.isfinite(np.asarray(out)), _ref_top_p_keep(logits, 0.5))

  @chex.variants(with_jit=True, without_jit=True)
  def test_process_logits_order(self):
    """temperature -> top-k -> top-p on the renormalised top-k distribution."""
    logits = _distinct_logits(5, (4, 10))
    t, k, p = 0.7, 5, 0.8
    fn = functools.partial(sampling.process_logits, temperature=t, top_k=k, top_p=p)
    out = self.variant(fn)(logits)
    scaled = logits.astype(np.float64) / t
    keep_k = _ref_top_k_keep(scaled, k)
    after_k = np.where(keep_k, scaled, -np.inf)
    keep = keep_k & _ref_top_p_keep(after_k, p)
    np.testing.assert_array_equal(np.isfinite(np.asarray(out)), keep)
    np.testing.assert_allclose(jax.nn.softmax(out, -1),
                               _softmax64(np.where(keep, scaled, -np.inf)),
                               rtol=1e-5, atol=1e-7)

  @parameterized.parameters(
      dict(kw=dict(temperature=-1.0), err=ValueError),
      dict(kw=dict(top_k=0), err=ValueError),
      dict(kw=dict(top_k=2.5), err=TypeError),
      dict(kw=dict(top_p=0.0), err=ValueError),
      dict(kw=dict(top_p=1.5), err=ValueError),
  )
  def test_bad_arguments(self, kw, err):
    with self.assertRaisesRegex(err, next(iter(kw))):
      sampling.sample_token(jax.random.PRNGKey(0), jnp.zeros((1, 4)), **kw)

  def test_bad_logits_rank(self):
    with self.assertRaisesRegex(ValueError, "logits_BV"):
      sampling.sample_token(jax.random.PRNGKey(0), jnp.zeros((4,)))


class SampleTokenTest(chex.TestCase, parameterized.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_temperature_zero_is_greedy(self):
    logits = _distinct_logits(6, (5, 9))
    fn = functools.partial(sampling.sample_token, temperature=0.0)
    out = self.variant(fn)(jax.random.PRNGKey(0), logits)
    np.testing.assert_array_equal(np.asarray(out), np.argmax(logits, -1))
    # Traced zero temperature as well.
    out = self.variant(sampling.sample_token)(jax.random.PRNGKey(0), logits,
                                              temperature=jnp.float32(0.0))
    np.testing.assert_array_equal(np.asarray(out), np.argmax(logits, -1))

  @chex.variants(with_jit=True, without_jit=True)
  def test_seeded(self):
    logits = _distinct_logits(7, (8, 16)) * 0.1
    fn = self.variant(sampling.sample_token)
    a = fn(jax.random.PRNGKey(3), logits)
    b = fn(jax.random.PRNGKey(3), logits)
    c = fn(jax.random.PRNGKey(4), logits)
    np.testing.assert_array_equal(a, b)
    self.assertFalse(np.array_equal(a, c))

  @parameterized.named_parameters(
      ("plain", dict()),
      ("temperature", dict(temperature=0.5)),
      ("top_k", dict(top_k=3)),
      ("top_p", dict(top_p=0.7)),
      ("all", dict(temperature=1.5, top_k=4, top_p=0.8)),
  )
  def test_empirical_distribution(self, kw):
    """Frequencies over many draws match the reference distribution (5-sigma bound)."""
    logits = np.asarray([[0.3, 1.2, -0.5, 0.9, 0.0, 1.5]], np.float32)
    n = 20000
    keys = jax.random.split(jax.random.PRNGKey(0), n)
    draw = jax.jit(jax.vmap(lambda k: sampling.sample_token(k, logits, **kw)[0]))
    counts = np.bincount(np.asarray(draw(keys)), minlength=6) / n
    scaled = logits.astype(np.float64) / kw.get("temperature", 1.0)
    keep = np.ones_like(scaled, bool)
    if "top_k" in kw:
      keep &= _ref_top_k_keep(scaled, kw["top_k"])
    if "top_p" in kw:
      keep &= _ref_top_p_keep(np.where(keep, scaled, -np.inf), kw["top_p"])
    probs = _softmax64(np.where(keep, scaled, -np.inf))[0]
    np.testing.assert_array_equal(counts[~keep[0]], 0.0)
    sigma = np.sqrt(probs * (1 - probs) / n) + 1e-12
    self.assertLess(np.max(np.abs(counts - probs) / np.maximum(sigma, 1e-3)), 5.0)


if __name__ == "__main__":
  from absl.testing import absltest
  absltest.main()
