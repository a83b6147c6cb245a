"""One token stream read as nanoGPT reads it: random contiguous windows, resumable,
the same eval windows every time, and the causal LM reading a single file that way."""

from __future__ import annotations

import numpy as np
import pytest

from jaxformer import tasks
from jaxformer.data import token_windows
from jaxformer.data import tokenizers as tok_lib

STREAM = (np.arange(1000) * 7919 % 1009).astype(np.int32)  # no repeated windows


def _windows(**kw):
  args = dict(seq_len=8, batch_size=3, seed=5)
  args.update(kw)
  return token_windows.TokenWindows(STREAM, **args)


def test_rows_are_contiguous_windows_of_the_stream_at_their_starts():
  w = _windows()
  for b in range(20):
    batch, starts = w[b], w.starts(b)
    assert sorted(batch) == ["inputs", "targets"]
    assert batch["inputs"].shape == batch["targets"].shape == (3, 8)
    assert batch["inputs"].dtype == np.int32
    assert ((0 <= starts) & (starts <= len(STREAM) - 9)).all()
    for row, s in enumerate(starts):
      np.testing.assert_array_equal(batch["inputs"][row], STREAM[s:s + 8])
      np.testing.assert_array_equal(batch["targets"][row], STREAM[s + 1:s + 9])


def test_draws_are_fixed_by_seed_and_index_and_cover_the_stream():
  a, b = _windows(), _windows()
  np.testing.assert_array_equal(a[7]["inputs"], b[7]["inputs"])
  assert not np.array_equal(a[7]["inputs"], a[8]["inputs"])
  assert not np.array_equal(a[7]["inputs"], _windows(seed=6)[7]["inputs"])
  starts = np.concatenate([a.starts(i) for i in range(400)])
  # uniform over [0, 991]: both ends reached, the mean near the middle
  assert starts.min() < 10 and starts.max() > 980
  assert abs(starts.mean() - 495.5) < 25


def test_process_shards_split_the_global_batch():
  whole = _windows(batch_size=4)
  parts = [_windows(batch_size=2, shard_index=i, shard_count=2) for i in range(2)]
  for b in range(5):
    np.testing.assert_array_equal(
        np.concatenate([p[b]["inputs"] for p in parts]), whole[b]["inputs"])


@pytest.mark.parametrize("prefetch", [0, 2])
def test_exact_resume_from_the_iterator_state(prefetch):
  def pipe():
    return token_windows.window_pipeline(STREAM, seq_len=8, batch_size=3, seed=1,
                                         prefetch=prefetch)
  it = pipe()
  for _ in range(4):
    next(it)
  state = it.get_state()
  want = [next(it)["inputs"] for _ in range(3)]
  resumed = pipe()
  resumed.set_state(state)
  got = [next(resumed)["inputs"] for _ in range(3)]
  for g, x in zip(got, want):
    np.testing.assert_array_equal(g, x)
  np.testing.assert_array_equal(want[0], _windows(seed=1)[4]["inputs"])


def test_bad_input_names_the_field():
  with pytest.raises(ValueError, match=r"fewer than data.seq_len \+ 1 = 9"):
    token_windows.TokenWindows(STREAM[:8], seq_len=8, batch_size=1, seed=0)
  with pytest.raises(ValueError, match="batch_size must be an int >= 1"):
    _windows(batch_size=0)
  with pytest.raises(ValueError, match="1-D integer"):
    token_windows.TokenWindows(np.zeros((2, 20)), seq_len=4, batch_size=1, seed=0)
  with pytest.raises(ValueError, match="prefetch"):
    token_windows.window_pipeline(STREAM, seq_len=4, batch_size=1, seed=0,
                                  prefetch=-1)


def test_causal_lm_reads_one_file_as_a_stream_and_several_as_documents(tmp_path):
  text = "".join(f"line {i}: to be or not to be, that is the question.\n"
                 for i in range(200))
  (tmp_path / "one.txt").write_text(text)
  tok = tok_lib.ByteTokenizer()

  def task(path):
    data = dict(source="text_files", tokenizer="bytes", seq_len=16, batch_size=4,
                eval_batch_size=4, pack=True, prefetch=0,
                source_options=dict(path=str(path), validation_fraction=0.1,
                                    window_bytes=64, seed=0))
    return tasks.build_task({"task": "causal_lm", "data": data}, tokenizer=tok)

  one = task(tmp_path / "one.txt")
  batch = next(one.batches(batch_size=4, seed=0, train=True))
  assert sorted(batch) == ["inputs", "targets"]   # no segments, no padding
  train_text = text.encode()[:len(text) - round(0.1 * len(text))]
  for row in batch["inputs"]:
    assert tok.decode(row.tolist()).encode() in train_text  # no separators
  first = [b["inputs"] for b in (next(one.batches(batch_size=4, seed=0, train=False)),
                                 next(one.batches(batch_size=4, seed=0, train=False)))]
  np.testing.assert_array_equal(*first)   # the same eval windows every time
  val_text = text.encode()[len(train_text):]
  assert all(tok.decode(r.tolist()).encode() in val_text for r in first[0])

  (tmp_path / "more").mkdir()
  for i in range(3):
    (tmp_path / "more" / f"{i}.txt").write_text(text[i * 100:i * 100 + 300])
  several = next(task(tmp_path / "more").batches(batch_size=4, seed=0, train=True))
  assert "segment_ids" in several and (several["inputs"] == tok.bos_id).any()
