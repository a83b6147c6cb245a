"""LM pipeline: packing invariants, exact coverage, resume, sharding."""

from __future__ import annotations

import json

from absl.testing import parameterized
import numpy as np
import pytest

from jaxformer.data import embedded
from jaxformer.data import pipeline
from jaxformer.data import tokenizers

TOK = tokenizers.ByteTokenizer()


def _random_docs(n: int = 40, seed: int = 0) -> list[dict[str, bytes]]:
  rng = np.random.default_rng(seed)
  lengths = rng.integers(0, 90, size=n)
  lengths[min(3, n - 1)] = 0  # an empty document is skipped
  lengths[min(5, n - 1)] = 200  # longer than several rows
  return [{"text": bytes(rng.integers(0, 256, size=k, dtype=np.uint8))}
          for k in lengths]


def _check_row_invariants(batch: dict[str, np.ndarray]) -> None:
  seg, pos, w = batch["segment_ids"], batch["positions"], batch["weights"]
  inputs, targets = batch["inputs"], batch["targets"]
  assert set(batch) == {"inputs", "targets", "segment_ids", "positions", "weights"}
  for k, dtype in (("inputs", np.int32), ("targets", np.int32),
                   ("segment_ids", np.int32), ("positions", np.int32),
                   ("weights", np.float32)):
    assert batch[k].dtype == dtype, k
  np.testing.assert_array_equal(w, (seg > 0).astype(np.float32))
  np.testing.assert_array_equal(inputs[seg == 0], TOK.pad_id)
  np.testing.assert_array_equal(pos[seg == 0], 0)
  for r in range(seg.shape[0]):
    real = seg[r] > 0
    # Padding only at the end of a row; segment ids 1, 2, ... in order.
    n = int(real.sum())
    assert real[:n].all() and not real[n:].any()
    s = seg[r, :n]
    assert s[0] == 1 if n else True
    assert np.all(np.diff(s) >= 0) and np.all(np.diff(s) <= 1)
    starts = np.concatenate([[True], s[1:] != s[:-1]]) if n else np.zeros(0, bool)
    # Positions restart at each segment and count up by one inside it.
    np.testing.assert_array_equal(pos[r, :n][starts], 0)
    np.testing.assert_array_equal(np.diff(pos[r, :n])[~starts[1:]], 1)
    # Inside a segment the target is the next input (nothing crosses segments).
    same = ~starts[1:]
    np.testing.assert_array_equal(targets[r, :n - 1][same], inputs[r, 1:n][same])
    # A segment ending before the row's end closes its document with EOS.
    ends = np.concatenate([s[1:] != s[:-1], [n < seg.shape[1]]]) if n else []
    np.testing.assert_array_equal(targets[r, :n][ends], TOK.eos_id)


def _documents_from_batches(batches, streams: int) -> list[bytes]:
  """Rebuilds the documents (in stream order) from packed batches."""
  docs, pending = [], [[] for _ in range(streams)]
  for batch in batches:
    for r in range(batch["inputs"].shape[0]):
      s = r % streams
      seg = batch["segment_ids"][r]
      for sid in range(1, int(seg.max(initial=0)) + 1):
        sel = seg == sid
        pending[s].extend(batch["inputs"][r][sel].tolist())
        if batch["targets"][r][sel][-1] == TOK.eos_id:
          assert pending[s][0] == TOK.bos_id
          docs.append(bytes(pending[s][1:]))
          pending[s] = []
  assert all(not p for p in pending), "a document was cut off"
  return docs


class LMPipelineTest(parameterized.TestCase):

  @parameterized.product(pack=[True, False], streams=[1, 3])
  def test_covers_every_document_once(self, pack, streams):
    source = _random_docs()
    it = pipeline.lm_pipeline(source, TOK, seq_len=16, batch_size=3, seed=1,
                              num_epochs=1, pack=pack, streams=streams)
    batches = list(it)
    for batch in batches:
      _check_row_invariants(batch)
      assert batch["inputs"].shape == (3, 16)
      if not pack:
        assert batch["segment_ids"].max() <= 1
    docs = _documents_from_batches(batches, streams)
    expected = [d["text"] for d in source if d["text"]]
    self.assertCountEqual(docs, expected)
    # Same seed, same order; another seed, another order.
    again = list(pipeline.lm_pipeline(source, TOK, seq_len=16, batch_size=3, seed=1,
                                      num_epochs=1, pack=pack, streams=streams))
    np.testing.assert_array_equal(np.stack([b["inputs"] for b in batches]),
                                  np.stack([b["inputs"] for b in again]))
    other = _documents_from_batches(
        pipeline.lm_pipeline(source, TOK, seq_len=16, batch_size=3, seed=2,
                             num_epochs=1, pack=pack, streams=streams), streams)
    self.assertNotEqual(docs, other)

  def test_packing_is_dense_and_long_documents_split(self):
    source = [{"text": b"a" * 40}, {"text": b"bc"}]
    batches = list(pipeline.lm_pipeline(source, TOK, seq_len=16, batch_size=2,
                                        seed=0, num_epochs=1, shuffle=False))
    seg = np.concatenate([b["segment_ids"] for b in batches])
    # 41 + 3 pairs = 44 slots: rows 16, 16, 16 (9 + 3 and padding 4).
    np.testing.assert_array_equal(seg[:2], 1)
    np.testing.assert_array_equal(seg[2], [1] * 9 + [2] * 3 + [0] * 4)
    np.testing.assert_array_equal(seg[3], 0)
    inputs = np.concatenate([b["inputs"] for b in batches])
    assert inputs[0, 0] == TOK.bos_id and inputs[1, 0] == ord("a")  # continuation
    pos = np.concatenate([b["positions"] for b in batches])
    np.testing.assert_array_equal(pos[2, 9:12], [0, 1, 2])

  @parameterized.product(pack=[True, False], prefetch=[0, 2])
  def test_resume_is_exact(self, pack, prefetch):
    source = embedded.stdlib_text_source("validation")
    kwargs = dict(seq_len=32, batch_size=4, seed=3, pack=pack, prefetch=prefetch)
    it = pipeline.lm_pipeline(source, TOK, **kwargs)
    for _ in range(7):
      next(it)
    state = json.loads(json.dumps(it.get_state()))
    expected = [next(it) for _ in range(5)]
    restored = pipeline.lm_pipeline(source, TOK, **kwargs)
    next(restored)  # its own progress is overwritten
    restored.set_state(state)
    for want in expected:
      got = next(restored)
      for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)

  def test_resume_mid_document_at_epoch_end(self):
    source = _random_docs(n=6)
    kwargs = dict(seq_len=8, batch_size=2, seed=0, num_epochs=2)
    full = list(pipeline.lm_pipeline(source, TOK, **kwargs))
    for k in (1, len(full) // 2, len(full) - 1, len(full)):
      it = pipeline.lm_pipeline(source, TOK, **kwargs)
      for _ in range(k):
        next(it)
      resumed = pipeline.lm_pipeline(source, TOK, **kwargs)
      resumed.set_state(json.loads(json.dumps(it.get_state())))
      rest = list(resumed)
      assert len(rest) == len(full) - k
      for got, want in zip(rest, full[k:]):
        np.testing.assert_array_equal(got["targets"], want["targets"])

  def test_shards_disjoint_and_covering(self):
    source = _random_docs(n=31, seed=4)
    shards = []
    for i in range(3):
      it = pipeline.lm_pipeline(source, TOK, seq_len=16, batch_size=2, seed=5,
                                shard_index=i, shard_count=3, num_epochs=1)
      shards.append(_documents_from_batches(it, streams=1))
    assert sum(map(len, shards)) == len([d for d in source if d["text"]])
    for i in range(3):
      for j in range(i + 1, 3):
        assert not set(shards[i]) & set(shards[j])
    self.assertCountEqual(sum(shards, []), [d["text"] for d in source if d["text"]])

  def test_endless_training_rows_come_from_different_documents(self):
    it = pipeline.lm_pipeline(embedded.stdlib_text_source("train"), TOK, seq_len=64,
                              batch_size=12, seed=0)
    for _ in range(5):
      batch = next(it)
      _check_row_invariants(batch)
      assert batch["weights"].mean() > 0.99  # dense
    rows = {batch["inputs"][r].tobytes() for r in range(12)}
    assert len(rows) == 12

  def test_drop_remainder(self):
    source = [{"text": b"x" * 39}]  # 40 pairs = 5 rows of 8: one full batch + 1 row
    kwargs = dict(seq_len=8, batch_size=4, seed=0, num_epochs=1)
    kept = list(pipeline.lm_pipeline(source, TOK, **kwargs))
    dropped = list(pipeline.lm_pipeline(source, TOK, drop_remainder=True, **kwargs))
    assert len(kept) == 2 and len(dropped) == 1
    np.testing.assert_array_equal(kept[1]["weights"].sum(axis=1), [8, 0, 0, 0])

  def test_bad_arguments(self):
    source = _random_docs(n=4)
    with pytest.raises(ValueError, match="seq_len"):
      pipeline.lm_pipeline(source, TOK, seq_len=0, batch_size=2, seed=0)
    with pytest.raises(ValueError, match="shard_index"):
      pipeline.lm_pipeline(source, TOK, seq_len=8, batch_size=2, seed=0,
                           shard_index=2, shard_count=2)
    with pytest.raises(ValueError, match="streams"):
      pipeline.lm_pipeline(source, TOK, seq_len=8, batch_size=2, seed=0, streams=3)
    with pytest.raises(TypeError, match="tokenizer"):
      pipeline.lm_pipeline(source, "bytes", seq_len=8, batch_size=2, seed=0)
    with pytest.raises(ValueError, match="text_key"):
      next(pipeline.lm_pipeline(source, TOK, seq_len=8, batch_size=2, seed=0,
                                text_key="body"))


def test_data_without_tokens_is_an_error_naming_the_source(tmp_path):
  """Issue 12 item 8: an endless pipeline over empty texts used to spin forever."""
  from jaxformer.data import sources  # pylint: disable=g-import-not-at-top
  (tmp_path / "empty.txt").write_bytes(b"")
  source = sources.text_files_source(str(tmp_path / "empty.txt"))
  it = pipeline.lm_pipeline(source, TOK, seq_len=8, batch_size=2, seed=0)
  with pytest.raises(ValueError, match=r"empty\.txt.*gives no tokens"):
    next(it)


class _SmallVocab(tokenizers.ByteTokenizer):
  """A tokenizer whose ids can fall outside its vocabulary (a broken one)."""

  @property
  def vocab_size(self) -> int:
    return 100


def test_token_ids_outside_the_vocabulary_are_an_error():
  source = [{"text": b"abc"}]   # bytes 97..99 < 100: fine
  assert next(pipeline.lm_pipeline(source, _SmallVocab(), seq_len=4, batch_size=1,
                                   seed=0))["inputs"].shape == (1, 4)
  with pytest.raises(ValueError, match=r"token ids of a document must be in \[0, 100\)"):
    next(pipeline.lm_pipeline([{"text": b"xyz"}], _SmallVocab(), seq_len=4,
                              batch_size=1, seed=0))
  with pytest.raises(ValueError, match=r"token ids of a text must be in \[0, 100\)"):
    next(pipeline.classification_pipeline([{"text": b"xyz", "label": 0}],
                                          _SmallVocab(), seq_len=4, batch_size=1,
                                          seed=0, num_epochs=1))
  with pytest.raises(ValueError, match=r"token ids of a text must be in \[0, 100\)"):
    next(pipeline.seq2seq_pipeline([{"source": b"abc", "target": b"xyz"}],
                                   _SmallVocab(), source_len=4, target_len=4,
                                   batch_size=1, seed=0, num_epochs=1))
