"""BLEU at eval time for seq2seq runs (jaxformer/tasks/seq2seq.py).

A tiny random ``EncoderDecoder`` decodes a few sources once, independently, with
``generate_seq2seq``; batches whose references *are* those outputs must score BLEU 100,
and changing a reference must give exactly sacrebleu's score of the changed strings.
"""

from __future__ import annotations

import logging

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxformer.data import pipeline
from jaxformer.data import tokenizers
from jaxformer.generation import metrics as gen_metrics
from jaxformer.generation import seq2seq as seq2seq_gen
from jaxformer.models import encoder_decoder
from jaxformer import tasks
from jaxformer.tasks import seq2seq as seq2seq_eval
from jaxformer.training import sharding

TOK = tokenizers.CharTokenizer("abcdefghij")   # 7 specials + 10 chars = 17 ids
SOURCE_LEN, TARGET_LEN = 6, 8                  # batch lengths
MAX_LEN = 6                                    # model positions = decoding steps
SHIFT = 3.0
SOURCES = ("abcde", "jihgf", "aabbc", "cdcdc")


def _batch(sources, targets):
  encode = pipeline.EncodeSeq2Seq(TOK, SOURCE_LEN, TARGET_LEN, "source", "target")
  rows = [encode({"source": s, "target": t}) for s, t in zip(sources, targets)]
  return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def _never_special(params):
  """Params whose greedy outputs are always characters (so never stop early).

  The output kernel's special columns are zeroed (logit 0); every character column
  gets +SHIFT on feature 0, where the decoder's final-norm bias adds +SHIFT too, so a
  character's logit is about SHIFT**2 plus the usual O(1) terms.
  """
  params = jax.tree.map(jnp.asarray, nn.meta.unbox(params))
  chars = np.array([i for i in range(TOK.vocab_size) if i not in TOK.special_ids])
  kernel_DV = params["output"]["kernel"].at[:, np.array(TOK.special_ids)].set(0.0)
  params["output"]["kernel"] = kernel_DV.at[0, chars].add(SHIFT)
  bias_D = params["decoder"]["final_norm"]["bias"]
  params["decoder"]["final_norm"]["bias"] = bias_D.at[0].add(SHIFT)
  return params


@pytest.fixture(scope="module")
def setup():
  """``(runtime, params, model_config, hyps)``: hyps = greedy outputs of SOURCES."""
  cfg = encoder_decoder.transformer_tiny(
      vocab_size=TOK.vocab_size, max_len=MAX_LEN, num_encoder_layers=1,
      num_decoder_layers=1, norm="pre", tie_output=False)
  model = encoder_decoder.EncoderDecoder(cfg)
  params = _never_special(jax.jit(lambda key: model.init(
      key, jnp.zeros((1, SOURCE_LEN), jnp.int32),
      jnp.zeros((1, MAX_LEN), jnp.int32))["params"])(jax.random.key(1)))
  batch = _batch(SOURCES, SOURCES)
  tokens_BT, _ = seq2seq_gen.generate_seq2seq(
      model, params, batch["inputs"], source_mask=batch["inputs_mask"],
      max_new_tokens=MAX_LEN, bos_id=TOK.bos_id, eos_id=TOK.eos_id, pad_id=TOK.pad_id,
      temperature=0.0)
  hyps = [seq2seq_eval.ids_to_text(row[1:], TOK) for row in np.asarray(tokens_BT)]
  # Never stops early (so char 4-grams exist), and the outputs depend on the source.
  assert all(len(h) == MAX_LEN for h in hyps) and len(set(hyps)) > 1, hyps
  runtime = tasks.Runtime(model=model, sharding=sharding.Sharding.build(
      sharding.ShardingConfig(mesh_shape=(1, 1, 1)), jax.devices()[:1]))
  return runtime, params, cfg, hyps


def _bleu(setup, batches, tokenize="char"):
  runtime, params, _, _ = setup
  return seq2seq_eval.bleu_of_batches(runtime, params, batches, TOK,
                                      max_new_tokens=MAX_LEN, tokenize=tokenize)


def test_ids_to_text_stops_at_eos_and_drops_specials():
  a, b, c = TOK.encode("abc")
  assert seq2seq_eval.ids_to_text([a, b, TOK.eos_id, c], TOK) == "ab"
  assert seq2seq_eval.ids_to_text([TOK.pad_id, a, TOK.bos_id, b], TOK) == "ab"
  assert seq2seq_eval.ids_to_text(np.array([TOK.eos_id, a]), TOK) == ""


def test_references_equal_to_greedy_outputs_score_100(setup):
  hyps = setup[-1]
  score = _bleu(setup, [_batch(SOURCES[:2], hyps[:2]), _batch(SOURCES[2:], hyps[2:])])
  assert score == pytest.approx(100.0)


def test_score_is_sacrebleu_of_decoded_strings(setup):
  hyps = setup[-1]
  refs = list(hyps)
  refs[0] = refs[0][:-1] + ("a" if refs[0][-1] != "a" else "b")  # last char changed
  refs[3] = "j" + refs[3]                                          # one char added
  score = _bleu(setup, [_batch(SOURCES, refs)])
  want = gen_metrics.bleu(hyps, refs, tokenize="char")
  assert score == pytest.approx(want, rel=1e-12) and 0.0 < score < 99.0


def test_padding_rows_are_left_out(setup):
  hyps = setup[-1]
  batch = _batch(SOURCES, hyps[:3] + ["jjjjjjj"])
  batch["weights"][3] = 0.0   # a padding row: its (wrong) reference must not count
  assert _bleu(setup, [batch]) == pytest.approx(100.0)


def _task(cfg, **options):
  data = dict(source="reversal", source_len=SOURCE_LEN, target_len=TARGET_LEN,
              batch_size=4, eval_batch_size=4)
  return tasks.TASKS["seq2seq"](data,
                                {"bleu_tokenize": "char", **options}, tokenizer=TOK,
                                model_config=cfg)


def test_eval_metrics_use_the_first_bleu_batches(setup):
  runtime, params, cfg, hyps = setup
  good = _batch(SOURCES, hyps)
  bad = _batch(SOURCES, ["jjjjj"] * 4)
  task = _task(cfg, bleu_batches=1)
  assert task.eval_metrics(params, [good, bad], {}, runtime) == {
      "bleu": pytest.approx(100.0)}
  # decoding steps: data.target_len capped by model.max_len (else generate raises)
  task2 = _task(cfg, bleu_batches=2)
  assert task2.eval_metrics(params, [good, bad], {}, runtime)["bleu"] < 100.0


def test_bleu_off_missing_or_bad_options(setup, monkeypatch, caplog):
  runtime, params, cfg, _ = setup
  batches = [_batch(SOURCES, SOURCES)]
  assert _task(cfg).eval_metrics(params, batches, {}, runtime) == {}   # default 0
  assert _task(cfg, bleu_batches=0).eval_metrics(params, batches, {}, runtime) == {}
  with pytest.raises(ValueError, match="bleu_batches=-1"):
    _task(cfg, bleu_batches=-1)
  with pytest.raises(ValueError, match="bleu_tokenize='words'"):
    _task(cfg, bleu_batches=1, bleu_tokenize="words")
  monkeypatch.setattr(seq2seq_eval, "_sacrebleu_available", lambda: False)
  with caplog.at_level(logging.WARNING):
    task = _task(cfg, bleu_batches=1)
  assert task.eval_metrics(params, batches, {}, runtime) == {}
  assert "sacrebleu is not installed" in caplog.text
