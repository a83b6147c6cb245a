"""BERT masking statistics and the MLM loss."""

from __future__ import annotations

from absl.testing import parameterized
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxformer.objectives import masked_lm
import objectives_reference as reference  # same directory

VOCAB, MASK, PAD, CLS, SEP = 50, 3, 0, 1, 2
SPECIAL = (PAD, CLS, SEP, MASK)


def _tokens(shape=(64, 128), seed=0):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(4, VOCAB, size=shape)
  tokens[:, 0] = CLS
  tokens[:, 60] = SEP
  tokens[:, 100:] = PAD
  return jnp.asarray(tokens, jnp.int32)


class MaskTokensTest(chex.TestCase, parameterized.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters((0.15, 0.8, 0.1), (0.3, 0.5, 0.25))
  def test_rates(self, rate, p_mask, p_random):
    tokens = _tokens()
    fn = self.variant(lambda k, t: masked_lm.mask_tokens(
        k, t, vocab_size=VOCAB, mask_id=MASK, special_ids=SPECIAL, mask_rate=rate,
        replace_mask=p_mask, replace_random=p_random))
    inputs, targets, weights = map(np.asarray, fn(jax.random.key(0), tokens))
    tokens = np.asarray(tokens)
    np.testing.assert_array_equal(targets, tokens)
    special = np.isin(tokens, SPECIAL)
    chosen = weights > 0
    assert not chosen[special].any()  # specials never chosen
    np.testing.assert_array_equal(inputs[~chosen], tokens[~chosen])
    n_eligible, n_chosen = (~special).sum(), chosen.sum()  # ~6300 eligible
    tol = 4 * np.sqrt(rate * (1 - rate) / n_eligible)
    assert abs(n_chosen / n_eligible - rate) < tol
    as_mask = (inputs == MASK) & chosen
    changed = (inputs != tokens) & ~as_mask
    kept = (inputs == tokens) & chosen
    tol = 4 * np.sqrt(0.25 / n_chosen)
    assert abs(as_mask.sum() / n_chosen - p_mask) < tol
    # Random replacements can hit the original token (prob 1/46): correct for it.
    p_changed = p_random * (1 - 1 / (VOCAB - len(SPECIAL)))
    assert abs(changed.sum() / n_chosen - p_changed) < tol
    assert abs(kept.sum() / n_chosen - (1 - p_mask - p_changed)) < tol
    # Random replacements are never special tokens.
    assert not np.isin(inputs[changed], SPECIAL).any()
    assert weights.dtype == np.float32 and inputs.dtype == np.int32

  def test_keys_give_different_masks(self):
    tokens = _tokens((4, 128))
    kwargs = dict(vocab_size=VOCAB, mask_id=MASK, special_ids=SPECIAL)
    a = masked_lm.mask_tokens(jax.random.key(0), tokens, **kwargs)
    b = masked_lm.mask_tokens(jax.random.key(0), tokens, **kwargs)
    c = masked_lm.mask_tokens(jax.random.key(1), tokens, **kwargs)
    np.testing.assert_array_equal(a[0], b[0])
    assert (np.asarray(a[2]) != np.asarray(c[2])).any()

  def test_bad_arguments(self):
    tokens = _tokens((2, 128))
    kwargs = dict(vocab_size=VOCAB, mask_id=MASK, special_ids=SPECIAL)
    with pytest.raises(ValueError, match="mask_rate"):
      masked_lm.mask_tokens(jax.random.key(0), tokens, mask_rate=1.5, **kwargs)
    with pytest.raises(ValueError, match="replace_mask \\+ replace_random"):
      masked_lm.mask_tokens(jax.random.key(0), tokens, replace_mask=0.9,
                            replace_random=0.2, **kwargs)
    with pytest.raises(ValueError, match="vocab_size"):
      masked_lm.mask_tokens(jax.random.key(0), tokens, vocab_size=VOCAB, mask_id=VOCAB,
                            special_ids=SPECIAL)
    with pytest.raises(TypeError, match="integer"):
      masked_lm.mask_tokens(jax.random.key(0), tokens.astype(jnp.float32), **kwargs)

  @chex.variants(with_jit=True, without_jit=True)
  def test_loss_only_on_chosen_positions(self):
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 7, VOCAB))
    targets = rng.integers(0, VOCAB, size=(3, 7))
    weights = (rng.random((3, 7)) < 0.3).astype(np.float32)
    loss, metrics = self.variant(masked_lm.loss)(
        jnp.asarray(logits, jnp.float32), jnp.asarray(targets, jnp.int32),
        jnp.asarray(weights))
    ce, nll, acc, total = reference.cross_entropy(logits, targets, weights)
    np.testing.assert_allclose(loss, ce, rtol=1e-5)
    np.testing.assert_allclose(metrics["accuracy"], acc, rtol=1e-6)
    np.testing.assert_allclose(metrics["num_tokens"], total)
