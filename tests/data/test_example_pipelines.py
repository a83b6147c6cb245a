"""Classification, seq2seq and image pipelines: contents, padding, resume."""

from __future__ import annotations

import json

import numpy as np
import pytest

from jaxformer.data import pipeline
from jaxformer.data import synthetic
from jaxformer.data import tokenizers

TOK = tokenizers.ByteTokenizer()


def test_classification_encoding_and_padding():
  source = [{"text": "ab", "label": 1}, {"text": "x" * 20, "label": 0},
            {"text": "é", "label": 2}]
  batches = list(pipeline.classification_pipeline(
      source, TOK, seq_len=6, batch_size=2, seed=0, num_epochs=1, shuffle=False))
  first, last = batches
  # [CLS] text [SEP], the text cut so that both fit.
  np.testing.assert_array_equal(first["inputs"][0],
                                [TOK.cls_id, 97, 98, TOK.sep_id] + [TOK.pad_id] * 2)
  np.testing.assert_array_equal(first["inputs_mask"][0], [1, 1, 1, 1, 0, 0])
  np.testing.assert_array_equal(first["inputs"][1],
                                [TOK.cls_id] + [ord("x")] * 4 + [TOK.sep_id])
  np.testing.assert_array_equal(first["labels"], [1, 0])
  np.testing.assert_array_equal(last["weights"], [1.0, 0.0])  # padded last batch
  np.testing.assert_array_equal(last["inputs"][0, :4], [TOK.cls_id, 0xC3, 0xA9, TOK.sep_id])
  assert last["inputs_mask"].dtype == bool and last["labels"].dtype == np.int32
  bare = next(pipeline.classification_pipeline(
      source, TOK, seq_len=6, batch_size=2, seed=0, num_epochs=1, shuffle=False,
      add_cls=False))
  np.testing.assert_array_equal(bare["inputs"][1], [ord("x")] * 6)


def test_classification_with_wordpiece_is_cls_text_sep(tmp_path):
  """A WordPiece tokenizer's texts are framed as BERT's tokenizer frames them."""
  pytest.importorskip("tokenizers")
  from jaxformer.pretrained import tokenizers as hf_tokenizers  # pylint: disable=g-import-not-at-top
  vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "good", "film", "bad", "##s"]
  (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
  tok = hf_tokenizers.wordpiece_tokenizer(str(tmp_path / "vocab.txt"))
  batch = next(pipeline.classification_pipeline(
      [{"text": "Good films", "label": 1}], tok, seq_len=7, batch_size=1, seed=0,
      num_epochs=1, shuffle=False))
  cls, sep, pad = tok.cls_id, tok.sep_id, tok.pad_id
  assert (cls, sep, pad) == (2, 3, 0)
  np.testing.assert_array_equal(batch["inputs"][0], [cls, 5, 6, 8, sep, pad, pad])


def test_seq2seq_teacher_forcing_layout():
  source = synthetic.reversal_source("train", num_examples=20)
  it = pipeline.seq2seq_pipeline(source, TOK, source_len=14, target_len=14,
                                 batch_size=4, seed=0)
  batch = next(it)
  for r in range(4):
    n = int(batch["weights"][r].sum())
    tgt = batch["targets"][r]
    assert tgt[n - 1] == TOK.eos_id and (tgt[n:] == TOK.pad_id).all()
    np.testing.assert_array_equal(batch["decoder_inputs"][r, 0], TOK.bos_id)
    np.testing.assert_array_equal(batch["decoder_inputs"][r, 1:n], tgt[:n - 1])
    src_n = int(batch["inputs_mask"][r].sum())
    src = TOK.decode(batch["inputs"][r, :src_n - 1])
    assert TOK.decode(tgt[:n - 1]) == src[::-1]
  np.testing.assert_array_equal(batch["example_weights"], 1.0)


def test_image_normalisation():
  source = [{"image": np.full((2, 2, 3), 255, np.uint8), "label": 3},
            {"image": np.zeros((2, 2, 3), np.uint8), "label": 1}]
  batch = next(pipeline.image_pipeline(source, batch_size=2, seed=0, shuffle=False,
                                       mean=(0.0, 0.5, 1.0), std=(1.0, 0.5, 2.0)))
  np.testing.assert_allclose(batch["image"][0, 0, 0], [1.0, 1.0, 0.0])
  np.testing.assert_allclose(batch["image"][1, 0, 0], [0.0, -1.0, -0.5])
  np.testing.assert_array_equal(batch["labels"], [3, 1])
  with pytest.raises(ValueError, match="std must be positive"):
    pipeline.image_pipeline(source, batch_size=2, seed=0, std=0.0)


@pytest.mark.parametrize("prefetch", [0, 2])
def test_example_pipeline_resume(prefetch):
  source = synthetic.shapes_source("validation", num_examples=40)
  kwargs = dict(batch_size=3, seed=7, shard_index=1, shard_count=2, prefetch=prefetch)
  it = pipeline.image_pipeline(source, **kwargs)
  for _ in range(9):  # crosses an epoch boundary (20 examples per shard)
    next(it)
  state = json.loads(json.dumps(it.get_state()))
  want = [next(it) for _ in range(4)]
  resumed = pipeline.image_pipeline(source, **kwargs)
  resumed.set_state(state)
  for w in want:
    got = next(resumed)
    np.testing.assert_array_equal(got["image"], w["image"])
    np.testing.assert_array_equal(got["labels"], w["labels"])


def test_example_pipeline_shards_cover_once():
  source = [{"x": np.int32(i)} for i in range(10)]
  seen = []
  for shard in range(3):
    for batch in pipeline.example_pipeline(source, batch_size=4, seed=0,
                                           shard_index=shard, shard_count=3,
                                           num_epochs=1):
      seen += batch["x"][batch["weights"] > 0].tolist()
  assert sorted(seen) == list(range(10))


def test_one_reader_applies_a_transform_with_the_read_options():
  """``read(source, transform, ReadOptions)`` is what every ``*_pipeline`` is; the
  read options are checked once, naming the field."""
  source = [{"text": "ab", "label": i % 2} for i in range(6)]
  encode = pipeline.EncodeClassification(TOK, seq_len=4)
  options = pipeline.ReadOptions(batch_size=4, seed=3, num_epochs=1)
  got = list(pipeline.read(source, encode, options))
  want = list(pipeline.classification_pipeline(source, TOK, seq_len=4, batch_size=4,
                                               seed=3, num_epochs=1))
  assert len(got) == len(want) == 2
  for g, w in zip(got, want):
    for key in w:
      np.testing.assert_array_equal(g[key], w[key])
  np.testing.assert_array_equal(got[1]["weights"], [1, 1, 0, 0])
  lm = next(pipeline.read_lm([{"text": "abcdef"}] * 3, TOK, options, seq_len=5))
  assert lm["inputs"].shape == (4, 5)
  for kwargs, match in [(dict(batch_size=0), "batch_size must be an int >= 1"),
                        (dict(batch_size=2, shard_index=2, shard_count=2),
                         r"shard_index must be in \[0, shard_count=2\)"),
                        (dict(batch_size=2, prefetch=-1), "prefetch must be")]:
    with pytest.raises(ValueError, match=match):
      pipeline.ReadOptions(**kwargs)
  with pytest.raises(ValueError, match="seq_len must be an int >= 1"):
    pipeline.EncodeClassification(TOK, seq_len=0)
  with pytest.raises(TypeError, match="random access"):
    pipeline.read(iter(source), encode, options)
