"""The sampling loop (`sample_loop`) and `generate`, on a pure step function and on GPT."""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import parameterized

from jaxformer.generation import decode

VOCAB = 11
TABLE_ROWS = 17


def _table():
  return np.random.default_rng(0).normal(size=(TABLE_ROWS, VOCAB)).astype(np.float32) * 3


def _history_step(table):
  """A step function whose logits depend on the whole prefix (sum of tokens) and position."""
  table = jnp.asarray(table)

  def step(cache, tokens_B1, positions_B1):
    total_B = cache["sum"] + tokens_B1[:, 0]
    key_B = (total_B * 7 + positions_B1[:, 0]) % TABLE_ROWS
    return table[key_B], {"sum": total_B}

  return step


def _reference_greedy(table, prompt, max_new, eos_id):
  """Full recompute: the next token is the arg-max given the whole prefix."""
  seq = list(prompt)
  for _ in range(max_new):
    key = (sum(seq) * 7 + len(seq) - 1) % TABLE_ROWS
    tok = int(np.argmax(table[key]))
    seq.append(tok)
    if eos_id is not None and tok == eos_id:
      break
  return seq


def _run_loop(prompt_BL, lengths_B, *, max_new, eos_id=None, pad_id=0, **kw):
  batch = prompt_BL.shape[0]
  fn = functools.partial(decode.sample_loop, _history_step(_table()),
                         max_new_tokens=max_new, eos_id=eos_id, pad_id=pad_id, **kw)
  return jax.jit(fn)({"sum": jnp.zeros((batch,), jnp.int32)}, prompt_BL, lengths_B)


class SampleLoopTest(chex.TestCase, parameterized.TestCase):

  @parameterized.parameters(None, 3, 5)
  def test_greedy_ragged_matches_reference(self, eos_id):
    prompt = np.array([[1, 2, 3, 4], [5, 6, 0, 0], [7, 0, 0, 0]], np.int32)
    lengths = np.array([4, 2, 1], np.int32)
    max_new = 6
    tokens, out_len = _run_loop(prompt, lengths, max_new=max_new, eos_id=eos_id, pad_id=9,
                                rng=jax.random.PRNGKey(0), greedy=True)
    tokens, out_len = np.asarray(tokens), np.asarray(out_len)
    self.assertEqual(tokens.shape, (3, 4 + max_new))
    for b in range(3):
      ref = _reference_greedy(_table(), prompt[b, :lengths[b]], max_new, eos_id)
      self.assertEqual(out_len[b], len(ref))
      np.testing.assert_array_equal(tokens[b, :len(ref)], ref)
      np.testing.assert_array_equal(tokens[b, len(ref):], 9)

  def test_eos_stops_rows_independently(self):
    # Row 1's first generated token is EOS; row 0 never produces it and runs to the end.
    prompt = np.array([[1, 2], [4, 0]], np.int32)
    lengths = np.array([2, 1], np.int32)
    ref0 = _reference_greedy(_table(), [1, 2], 8, None)
    ref1 = _reference_greedy(_table(), [4], 8, None)
    eos = ref1[1]
    self.assertNotIn(eos, ref0[2:])
    tokens, out_len = _run_loop(prompt, lengths, max_new=8, eos_id=eos, pad_id=10,
                                rng=jax.random.PRNGKey(0), greedy=True)
    tokens, out_len = np.asarray(tokens), np.asarray(out_len)
    np.testing.assert_array_equal(out_len, [10, 2])
    np.testing.assert_array_equal(tokens[0], ref0)
    np.testing.assert_array_equal(tokens[1], [4, eos] + [10] * 8)

  def test_sampling_seeded_and_batch_independent(self):
    prompt = np.array([[1, 2, 3], [5, 6, 0]], np.int32)
    lengths = np.array([3, 2], np.int32)
    keys = jax.random.split(jax.random.PRNGKey(42), 2)
    run = functools.partial(_run_loop, max_new=7, temperature=1.5, top_k=6)
    a, la = run(prompt, lengths, rng=keys)
    b, lb = run(prompt, lengths, rng=keys)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(la, lb)
    c, _ = run(prompt, lengths, rng=jax.random.split(jax.random.PRNGKey(7), 2))
    self.assertFalse(np.array_equal(a, c))
    # One key (raw or typed) means `split(key, batch)` row keys.
    for key in (jax.random.PRNGKey(42), jax.random.key(42)):
      one, _ = run(prompt, lengths, rng=key)
      many, _ = run(prompt, lengths, rng=jax.random.split(key, 2))
      np.testing.assert_array_equal(one, many)
    with self.assertRaisesRegex(ValueError, "rng"):
      run(prompt, lengths, rng=jax.random.split(jax.random.PRNGKey(0), 3))
    # Row 1 alone with its own key gives the same tokens as inside the batch.
    single, ls = run(prompt[1:, :2], lengths[1:], rng=keys[1:])
    np.testing.assert_array_equal(np.asarray(single[0, :int(ls[0])]),
                                  np.asarray(a[1, :int(la[1])]))

  def test_low_temperature_equals_greedy(self):
    prompt = np.array([[1, 2, 3]], np.int32)
    lengths = np.array([3], np.int32)
    g, _ = _run_loop(prompt, lengths, max_new=5, rng=jax.random.PRNGKey(0), greedy=True)
    s, _ = _run_loop(prompt, lengths, max_new=5, rng=jax.random.PRNGKey(0),
                     temperature=1e-4)
    np.testing.assert_array_equal(g, s)


def _tiny_gpt(**overrides):
  from jaxformer.models.gpt import GPT, gpt_tiny  # pylint: disable=g-import-not-at-top
  cfg = gpt_tiny(vocab_size=VOCAB_GPT, max_len=16, init_stddev=0.3, **overrides)
  model = GPT(cfg)
  init = jax.jit(lambda key: model.init(key, jnp.zeros((1, 16), jnp.int32))["params"])
  return model, init(jax.random.PRNGKey(1))


VOCAB_GPT = 32


def _full_recompute_greedy(model, params, prompt, max_new, eos_id=None, max_len=None):
  """Arg-max of a full forward on the growing sequence, one step at a time.

  The sequence is right-padded to the model's max_len (one compilation); causal attention
  makes the padding invisible to the position that is read.
  """
  max_len = max_len or model.config.max_len
  apply = jax.jit(lambda x: model.apply({"params": params}, x))
  seq = list(prompt)
  for _ in range(max_new):
    padded = jnp.asarray([seq + [0] * (max_len - len(seq))], jnp.int32)
    seq.append(int(jnp.argmax(apply(padded)[0, len(seq) - 1])))
    if eos_id is not None and seq[-1] == eos_id:
      break
  return seq


class GenerateGPTTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ("learned", dict()),
      ("rotary_scan", dict(positions="rotary", scan_layers=True)),
  )
  def test_cached_step_logits_equal_full_forward(self, overrides):
    model, params = _tiny_gpt(**overrides)
    seq = np.random.default_rng(0).integers(0, VOCAB_GPT, size=(2, 12)).astype(np.int32)
    full = np.asarray(jax.jit(model.apply)({"params": params}, seq))
    dec = decode.decoding_module(model)
    cache = decode.init_cache(dec, jnp.zeros((2, 12), jnp.int32))
    step = jax.jit(decode.flax_step_fn(dec, params))
    for t in range(12):
      logits, cache = step(cache, seq[:, t:t + 1], jnp.full((2, 1), t, jnp.int32))
      np.testing.assert_allclose(logits, full[:, t], rtol=1e-4, atol=1e-4)

  def test_greedy_ragged_equals_full_recompute(self):
    model, params = _tiny_gpt()
    prompts = [[3, 7, 1, 9, 4], [5, 2], [8]]
    prompt = np.zeros((3, 5), np.int32)
    for b, p in enumerate(prompts):
      prompt[b, :len(p)] = p
    lengths = np.array([len(p) for p in prompts], np.int32)
    tokens, out_len = decode.generate(model, params, prompt, max_new_tokens=7,
                                      temperature=0.0, prompt_lengths=lengths, pad_id=31)
    tokens, out_len = np.asarray(tokens), np.asarray(out_len)
    self.assertEqual(tokens.shape, (3, 12))
    for b, p in enumerate(prompts):
      ref = _full_recompute_greedy(model, params, p, 7)
      self.assertEqual(out_len[b], len(ref))
      np.testing.assert_array_equal(tokens[b, :len(ref)], ref)
      np.testing.assert_array_equal(tokens[b, len(ref):], 31)
    # A row alone (no padding, batch of one, a one-call prefill) gives the same result.
    single, _ = decode.generate(model, params, np.array([prompts[0]], np.int32),
                                max_new_tokens=7, temperature=0.0)
    np.testing.assert_array_equal(np.asarray(single)[0], tokens[0])

  def test_eos_and_seeded_sampling(self):
    model, params = _tiny_gpt()
    prompt = np.array([[3, 7, 1], [5, 2, 0]], np.int32)
    lengths = np.array([3, 2], np.int32)
    kw = dict(max_new_tokens=10, temperature=1.0, top_p=0.9, prompt_lengths=lengths,
              pad_id=0)
    a, la = decode.generate(model, params, prompt, rng=jax.random.PRNGKey(0), **kw)
    b, lb = decode.generate(model, params, prompt, rng=jax.random.PRNGKey(0), **kw)
    c, _ = decode.generate(model, params, prompt, rng=jax.random.PRNGKey(1), **kw)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(la, lb)
    self.assertFalse(np.array_equal(a, c))
    # Use a token that row 0 samples as EOS: row 0 stops right after its first
    # occurrence and every later position is padding.
    a = np.asarray(a)
    eos = int(a[0, 5])
    e, le = decode.generate(model, params, prompt, rng=jax.random.PRNGKey(0), eos_id=eos,
                            **kw)
    e, le = np.asarray(e), np.asarray(le)
    for row in range(2):
      gen = list(a[row, lengths[row]:lengths[row] + 10])
      stop = lengths[row] + (gen.index(eos) + 1 if eos in gen else 10)
      self.assertEqual(le[row], stop)
      np.testing.assert_array_equal(e[row, :stop], a[row, :stop])
      np.testing.assert_array_equal(e[row, stop:], 0)

  def test_too_long_for_the_model(self):
    model, params = _tiny_gpt()
    with self.assertRaisesRegex(ValueError, "max_len"):
      decode.generate(model, params, np.zeros((1, 10), np.int32), max_new_tokens=8,
                      temperature=0.0)

  def test_image_gpt_full_image(self):
    """ImageGPT: from SOS, all H*W clusters; the cache fills the model's max_len exactly."""
    from jaxformer.models.image_gpt import (  # pylint: disable=g-import-not-at-top
        ImageGPT, image_gpt_tiny)
    cfg = image_gpt_tiny(init_stddev=0.3)
    model = ImageGPT(cfg)
    params = jax.jit(lambda k: model.init(k, jnp.zeros((1, cfg.seq_len), jnp.int32)))(
        jax.random.PRNGKey(2))["params"]
    prompt = np.full((2, 1), cfg.sos_id, np.int32)
    tokens, lengths = decode.generate(model, params, prompt, max_new_tokens=cfg.seq_len,
                                      temperature=0.0)
    np.testing.assert_array_equal(np.asarray(lengths), [1 + cfg.seq_len] * 2)
    ref = _full_recompute_greedy(model, params, [cfg.sos_id], cfg.seq_len,
                                 max_len=cfg.seq_len)
    np.testing.assert_array_equal(np.asarray(tokens)[0], ref)
    sampled, _ = decode.generate(model, params, prompt, max_new_tokens=cfg.seq_len,
                                 rng=jax.random.PRNGKey(0), top_k=4)
    sampled = np.asarray(sampled)[:, 1:]
    self.assertTrue(np.all((sampled >= 0) & (sampled < cfg.num_clusters)))


class GenerateArgsTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ("prompt_rank", dict(prompt_BL=np.zeros((3,), np.int32)), ValueError, "prompt_BL"),
      ("prompt_dtype", dict(prompt_BL=np.zeros((1, 3), np.float32)), TypeError, "prompt_BL"),
      ("max_new", dict(max_new_tokens=0), ValueError, "max_new_tokens"),
      ("lengths_shape", dict(prompt_lengths=np.array([1, 2])), ValueError, "prompt_lengths"),
      ("lengths_zero", dict(prompt_lengths=np.array([0])), ValueError, "prompt_lengths"),
      ("lengths_long", dict(prompt_lengths=np.array([4])), ValueError, "prompt_lengths"),
      ("rng_missing", dict(rng=None), ValueError, "rng"),
      ("top_k", dict(top_k=0), ValueError, "top_k"),
      ("eos", dict(eos_id=1.5), TypeError, "eos_id"),
  )
  def test_bad_arguments(self, override, err, msg):
    kw = dict(prompt_BL=np.zeros((1, 3), np.int32), max_new_tokens=2,
              rng=jax.random.PRNGKey(0))
    kw.update(override)
    prompt = kw.pop("prompt_BL")
    with self.assertRaisesRegex(err, msg):
      decode.generate(object(), {}, prompt, **kw)

  def test_model_without_decode(self):
    with self.assertRaisesRegex(TypeError, "decode"):
      decode.decoding_module(object())


if __name__ == "__main__":
  from absl.testing import absltest
  absltest.main()
