"""Beam search: greedy for one beam, exhaustive for K = vocab over two steps, exact scores."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import parameterized

from jaxformer.generation import beam_search, seq2seq

BOS, PAD = 1, 0
VOCAB = 12


def _tiny_transformer():
  from jaxformer.models.encoder_decoder import (  # pylint: disable=g-import-not-at-top
      EncoderDecoder, transformer_tiny)
  model = EncoderDecoder(transformer_tiny(vocab_size=VOCAB, max_len=8, num_encoder_layers=1,
                                          num_decoder_layers=1, norm="pre",
                                          scan_layers=True))
  init = jax.jit(lambda key: model.init(key, jnp.zeros((1, 5), jnp.int32),
                                        jnp.zeros((1, 8), jnp.int32))["params"])
  return model, init(jax.random.PRNGKey(5))


_APPLY = {}


def _sequence_log_probs(model, params, source, targets):
  """log p(targets[1:] | source) for each target row (full forward, no cache)."""
  if id(model) not in _APPLY:
    _APPLY[id(model)] = jax.jit(lambda s, x: model.apply({"params": params}, s, x))
  targets = np.asarray(targets, np.int32)
  n, t = targets.shape
  src = np.repeat(source, n, axis=0)
  padded = np.pad(targets, ((0, 0), (0, 8 - t)), constant_values=PAD)
  logits = np.asarray(_APPLY[id(model)](src, padded), np.float64)[:, :t - 1]
  logp = logits - logits.max(-1, keepdims=True)
  logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
  return np.take_along_axis(logp, targets[:, 1:, None], -1)[..., 0].sum(-1)


class BeamSearchTest(parameterized.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.model, cls.params = _tiny_transformer()
    cls.source = np.array([[3, 5, 7, 9, 11], [4, 6, 8, PAD, PAD]], np.int32)
    cls.mask = cls.source != PAD

  def test_one_beam_is_greedy(self):
    tokens, scores, lengths = beam_search.beam_search_seq2seq(
        self.model, self.params, self.source, source_mask=self.mask, num_beams=1,
        max_new_tokens=5, bos_id=BOS)
    greedy, _ = seq2seq.generate_seq2seq(self.model, self.params, self.source,
                                         source_mask=self.mask, max_new_tokens=5,
                                         bos_id=BOS, temperature=0.0)
    np.testing.assert_array_equal(np.asarray(tokens)[:, 0], np.asarray(greedy))
    np.testing.assert_array_equal(np.asarray(lengths), [[6], [6]])
    self.assertEqual(scores.shape, (2, 1))

  def test_full_width_two_steps_is_exhaustive(self):
    source = self.source[:1]
    tokens, scores, _ = beam_search.beam_search_seq2seq(
        self.model, self.params, source, num_beams=VOCAB, max_new_tokens=2, bos_id=BOS)
    all_targets = np.array([[BOS, a, b] for a, b in itertools.product(range(VOCAB),
                                                                      repeat=2)])
    ref = _sequence_log_probs(self.model, self.params, source, all_targets)
    order = np.argsort(-ref, kind="stable")[:VOCAB]
    np.testing.assert_allclose(np.asarray(scores)[0], ref[order], rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(np.asarray(tokens)[0, 0], all_targets[order[0]])

  def test_eos_and_length_penalty_scores(self):
    # Pick as EOS a token that the 4-beam search emits early, so the pool mixes lengths.
    tokens, _, _ = beam_search.beam_search_seq2seq(
        self.model, self.params, self.source[:1], num_beams=4, max_new_tokens=4,
        bos_id=BOS)
    eos = int(np.asarray(tokens)[0, 1, 2])
    alpha = 0.6
    tokens, scores, lengths = beam_search.beam_search_seq2seq(
        self.model, self.params, self.source[:1], num_beams=4, max_new_tokens=4,
        bos_id=BOS, eos_id=eos, alpha=alpha, pad_id=PAD)
    tokens, scores, lengths = (np.asarray(x)[0] for x in (tokens, scores, lengths))
    self.assertTrue(np.all(np.diff(scores) <= 1e-6))  # best first
    self.assertLess(lengths.min(), 5)  # at least one hypothesis ended with EOS
    for seq, score, length in zip(tokens, scores, lengths):
      body = list(seq[1:length])
      if length < 5:
        self.assertEqual(body[-1], eos)
        np.testing.assert_array_equal(seq[length:], PAD)
      self.assertNotIn(eos, body[:-1])
      logp = _sequence_log_probs(self.model, self.params, self.source[:1],
                                 seq[None, :length])[0]
      expected = logp / ((5.0 + (length - 1)) / 6.0) ** alpha
      self.assertAlmostEqual(float(score), float(expected), places=3)

  def test_bad_num_beams(self):
    with self.assertRaisesRegex(ValueError, "num_beams"):
      beam_search.beam_search_seq2seq(self.model, self.params, self.source, num_beams=0,
                                      max_new_tokens=2, bos_id=BOS)

  def test_cache_batch_axes(self):
    axes = beam_search.cache_batch_axes(
        lambda n: {"k": jnp.zeros((3, n, 4)), "i": jnp.zeros((), jnp.int32),
                   "v": jnp.zeros((n, 2))})
    self.assertEqual(axes, {"k": 1, "i": None, "v": 0})


if __name__ == "__main__":
  from absl.testing import absltest
  absltest.main()
