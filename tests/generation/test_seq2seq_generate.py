"""Encoder-decoder generation with the cache equals a full recompute."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import parameterized

from jaxformer.generation import seq2seq

BOS, EOS, PAD = 1, 2, 0


def _tiny_transformer():
  from jaxformer.models.encoder_decoder import (  # pylint: disable=g-import-not-at-top
      EncoderDecoder, transformer_tiny)
  model = EncoderDecoder(transformer_tiny(vocab_size=24, max_len=12, num_encoder_layers=1,
                                          num_decoder_layers=2, norm="pre"))
  init = jax.jit(lambda key: model.init(key, jnp.zeros((1, 6), jnp.int32),
                                        jnp.zeros((1, 12), jnp.int32))["params"])
  return model, init(jax.random.PRNGKey(3))


def _full_recompute_greedy(model, params, source, mask, max_new):
  """Arg-max of a full (no cache) forward on the growing target, row by row."""
  apply = jax.jit(lambda s, t, m: model.apply({"params": params}, s, t, m))
  max_len = model.config.max_len
  out = []
  for b in range(source.shape[0]):
    seq = [BOS]
    for _ in range(max_new):
      tgt = jnp.asarray([seq + [PAD] * (max_len - len(seq))], jnp.int32)
      logits = apply(source[b:b + 1], tgt, mask[b:b + 1])[0, len(seq) - 1]
      seq.append(int(jnp.argmax(logits)))
    out.append(seq)
  return np.array(out)


class GenerateSeq2SeqTest(parameterized.TestCase):

  def test_greedy_equals_full_recompute(self):
    model, params = _tiny_transformer()
    source = np.array([[5, 9, 3, 7, 4, 11], [6, 8, 10, PAD, PAD, PAD]], np.int32)
    mask = source != PAD
    tokens, lengths = seq2seq.generate_seq2seq(
        model, params, source, source_mask=mask, max_new_tokens=8, bos_id=BOS,
        temperature=0.0)
    ref = _full_recompute_greedy(model, params, source, mask, 8)
    np.testing.assert_array_equal(np.asarray(tokens), ref)
    np.testing.assert_array_equal(np.asarray(lengths), [9, 9])
    # Outputs depend on the source (not a constant decoder).
    self.assertFalse(np.array_equal(ref[0], ref[1]))

  def test_sampling_seeded_and_eos(self):
    model, params = _tiny_transformer()
    source = np.array([[5, 9, 3, 7, 4, 11], [6, 8, 10, 12, 13, 14]], np.int32)
    kw = dict(max_new_tokens=8, bos_id=BOS, temperature=1.0, top_k=8, pad_id=PAD)
    a, _ = seq2seq.generate_seq2seq(model, params, source, rng=jax.random.PRNGKey(0), **kw)
    b, _ = seq2seq.generate_seq2seq(model, params, source, rng=jax.random.PRNGKey(0), **kw)
    np.testing.assert_array_equal(a, b)
    a = np.asarray(a)
    eos = int(a[0, 3])
    e, le = seq2seq.generate_seq2seq(model, params, source, rng=jax.random.PRNGKey(0),
                                     eos_id=eos, **kw)
    e, le = np.asarray(e), np.asarray(le)
    for row in range(2):
      gen = list(a[row, 1:])
      stop = 1 + (gen.index(eos) + 1 if eos in gen else 8)
      self.assertEqual(le[row], stop)
      np.testing.assert_array_equal(e[row, :stop], a[row, :stop])
      np.testing.assert_array_equal(e[row, stop:], PAD)

  @parameterized.named_parameters(
      ("source_rank", dict(source_BS=np.zeros((3,), np.int32)), ValueError, "source_BS"),
      ("mask_shape", dict(source_mask=np.ones((1, 2), bool)), ValueError, "source_mask"),
      ("bos", dict(bos_id=None), TypeError, "bos_id"),
      ("rng", dict(temperature=1.0), ValueError, "rng"),
      ("too_long", dict(max_new_tokens=13), ValueError, "max_len"),
  )
  def test_bad_arguments(self, override, err, msg):
    from jaxformer.models.encoder_decoder import (  # pylint: disable=g-import-not-at-top
        EncoderDecoder, transformer_tiny)
    kw = dict(source_BS=np.zeros((1, 4), np.int32), max_new_tokens=3, bos_id=BOS,
              temperature=0.0)
    kw.update(override)
    model = EncoderDecoder(transformer_tiny(max_len=12))
    with self.assertRaisesRegex(err, msg):
      seq2seq.generate_seq2seq(model, {}, kw.pop("source_BS"), **kw)


if __name__ == "__main__":
  from absl.testing import absltest
  absltest.main()
