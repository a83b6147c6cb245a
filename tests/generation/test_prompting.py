"""Zero-shot classification by prompting (`PromptClassifier`)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import parameterized

from jaxformer.data.tokenizers import ByteTokenizer
from jaxformer.generation import prompting

TOK = ByteTokenizer()


class BigramFixture(nn.Module):
  """Test fixture, not a model: logits at position i are ``table[token_i]``."""
  vocab: int

  @nn.compact
  def __call__(self, inputs_BL):
    table = self.param("table", nn.initializers.zeros, (self.vocab, self.vocab))
    return table[inputs_BL]


def _bigram_params():
  """'!' is followed by '+' (p high), '?' by '-'; everything else uniform."""
  table = np.zeros((TOK.vocab_size, TOK.vocab_size), np.float32)
  table[ord("!"), ord("+")] = 4.0
  table[ord("?"), ord("-")] = 4.0
  table[ord("x"), ord("+")] = 1.0
  return {"table": jnp.asarray(table)}


def _log_softmax64(x):
  x = np.asarray(x, np.float64)
  return x - x.max(-1, keepdims=True) - np.log(
      np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True))


class PromptClassifierTest(parameterized.TestCase):

  def _bigram_classifier(self, **kw):
    return prompting.PromptClassifier(
        BigramFixture(TOK.vocab_size), _bigram_params(), TOK, "{text}",
        {"neg": "-", "pos": "+"}, **kw)

  def test_scores_are_known_log_probs(self):
    clf = self._bigram_classifier(batch_size=3)
    texts = ["great!", "bad?", "meh", "x"]
    scores = clf.score(texts)
    logp = _log_softmax64(np.asarray(_bigram_params()["table"]))
    expected = np.array([[logp[ord(t[-1]), ord("-")], logp[ord(t[-1]), ord("+")]]
                         for t in texts])
    np.testing.assert_allclose(scores, expected, rtol=1e-5, atol=1e-5)
    self.assertEqual(clf.predict(texts), ["pos", "neg", "neg", "pos"])  # "meh": a tie
    self.assertEqual(clf.evaluate(texts, ["pos", "neg", "pos", "pos"]),
                     {"accuracy": 0.75, "num_examples": 4})

  def test_multi_token_verbalizer_and_normalisation(self):
    params = _bigram_params()
    model = BigramFixture(TOK.vocab_size)
    verbalizer = {0: "?-", 1: "!+x"}
    clf = prompting.PromptClassifier(model, params, TOK, "Q: {text}", verbalizer)
    logp = _log_softmax64(np.asarray(params["table"]))

    def seq_score(prev, word):
      chain = [prev] + [ord(c) for c in word]
      return sum(logp[a, b] for a, b in zip(chain[:-1], chain[1:]))

    scores = clf.score(["a", "b!"])
    expected = [[seq_score(ord("a"), "?-"), seq_score(ord("a"), "!+x")],
                [seq_score(ord("!"), "?-"), seq_score(ord("!"), "!+x")]]
    np.testing.assert_allclose(scores, expected, rtol=1e-5, atol=1e-5)
    norm = prompting.PromptClassifier(model, params, TOK, "Q: {text}", verbalizer,
                                      length_normalize=True).score(["a", "b!"])
    np.testing.assert_allclose(norm, np.asarray(expected) / np.array([[2, 3]]), rtol=1e-5)

  def test_sequences_layout(self):
    clf = self._bigram_classifier()
    inputs, weights = clf.sequences(["ab"])
    self.assertEqual(inputs.shape, (2, 16))
    np.testing.assert_array_equal(inputs[0, :4], [TOK.bos_id, ord("a"), ord("b"), ord("-")])
    np.testing.assert_array_equal(inputs[1, :4], [TOK.bos_id, ord("a"), ord("b"), ord("+")])
    np.testing.assert_array_equal(inputs[:, 4:], TOK.pad_id)
    np.testing.assert_array_equal(weights[:, :5], [[0, 0, 0, 1, 0]] * 2)

  def test_max_length_truncates_prompt_from_the_left(self):
    clf = self._bigram_classifier(max_length=4)
    inputs, weights = clf.sequences(["abcdef!"])
    np.testing.assert_array_equal(inputs[1], [TOK.bos_id, ord("f"), ord("!"), ord("+")])
    np.testing.assert_array_equal(weights[1], [0, 0, 0, 1])
    self.assertEqual(clf.predict(["abcdef!"]), ["pos"])

  def test_every_label_is_scored_on_the_same_prompt_tokens(self):
    """Verbalizers of 1 and 3 tokens, max_length 6: both labels see the same prompt
    (BOS + the last 2 prompt tokens, cut for the longest), and the scores are those
    of that one prompt (float64 bigram reference)."""
    params = _bigram_params()
    clf = prompting.PromptClassifier(BigramFixture(TOK.vocab_size), params, TOK,
                                     "{text}", {"short": "-", "long": "+x+"},
                                     max_length=6)
    inputs, weights = clf.sequences(["abcd?!"])
    prompts = [list(row[:int(np.argmax(w))]) for row, w in zip(inputs, weights)]
    self.assertEqual(prompts[0], prompts[1])
    self.assertEqual(prompts[0], [TOK.bos_id, ord("?"), ord("!")])
    logp = _log_softmax64(np.asarray(params["table"]))
    chain = lambda word: [ord("!")] + [ord(c) for c in word]  # noqa: E731
    want = [sum(logp[a, b] for a, b in zip(chain(w)[:-1], chain(w)[1:]))
            for w in ("-", "+x+")]
    np.testing.assert_allclose(clf.score(["abcd?!"])[0], want, rtol=1e-5, atol=1e-5)

  def test_matches_full_forward_of_gpt(self):
    from jaxformer.models.gpt import GPT, gpt_tiny  # pylint: disable=g-import-not-at-top
    cfg = gpt_tiny(vocab_size=TOK.vocab_size, max_len=32, init_stddev=0.3)
    model = GPT(cfg)
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"]
    verbalizer = {0: " no", 1: " yes", 2: " y"}
    clf = prompting.PromptClassifier(model, params, TOK, "T:{text}\nA:", verbalizer,
                                     batch_size=4)
    texts = ["hi", "a longer text"]
    scores = clf.score(texts)
    apply = jax.jit(lambda x: model.apply({"params": params}, x))
    for n, text in enumerate(texts):
      prompt = [TOK.bos_id] + TOK.encode(f"T:{text}\nA:")
      for c, word in enumerate(verbalizer.values()):
        seq = prompt + TOK.encode(word)
        # One sequence at a time, right-padded to 32 (invisible under causal attention).
        padded = np.array([seq + [0] * (32 - len(seq))], np.int32)
        logp = _log_softmax64(np.asarray(apply(padded))[0])
        ref = sum(logp[i - 1, seq[i]] for i in range(len(prompt), len(seq)))
        self.assertAlmostEqual(float(scores[n, c]), ref, places=4)
    np.testing.assert_array_equal(clf.predict(texts), np.argmax(scores, -1))

  @parameterized.named_parameters(
      ("no_field", dict(template="Review:"), ValueError, "template"),
      ("extra_field", dict(template="{text} {x}"), ValueError, "template"),
      ("one_label", dict(verbalizer={0: "a"}), ValueError, "verbalizer"),
      ("not_str", dict(verbalizer={0: "a", 1: 3}), TypeError, "verbalizer"),
      ("empty_word", dict(verbalizer={0: "a", 1: ""}), ValueError, "verbalizer"),
      ("max_length", dict(max_length=2), ValueError, "max_length"),
  )
  def test_bad_arguments(self, override, err, msg):
    kw = dict(template="{text}", verbalizer={0: "-", 1: "+"})
    kw.update(override)
    with self.assertRaisesRegex(err, msg):
      prompting.PromptClassifier(BigramFixture(TOK.vocab_size), _bigram_params(), TOK,
                                 kw.pop("template"), kw.pop("verbalizer"), **kw)

  def test_evaluate_checks_labels(self):
    clf = self._bigram_classifier()
    with self.assertRaisesRegex(ValueError, "labels"):
      clf.evaluate(["a"], ["pos", "neg"])
    with self.assertRaisesRegex(ValueError, "labels"):
      clf.evaluate(["a"], ["other"])


if __name__ == "__main__":
  from absl.testing import absltest
  absltest.main()
