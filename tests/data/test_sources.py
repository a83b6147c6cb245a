"""Sources: TFDS under mock_data, missing data_dir, local text files, registry."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow_datasets as tfds

from jaxformer.data import line_kinds
from jaxformer.data import pipeline
from jaxformer.data import sources
from jaxformer.data import synthetic
from jaxformer.data import tokenizers

TOK = tokenizers.ByteTokenizer()


def test_tfds_text_source_feeds_lm_pipeline():
  with tfds.testing.mock_data(num_examples=6):
    for name in ("tiny_shakespeare", "lm1b"):
      src = sources.get_source(name, "train")
      assert len(src) == 6
      batch = next(pipeline.lm_pipeline(src, TOK, seq_len=16, batch_size=2, seed=0))
      assert batch["inputs"].shape == (2, 16) and batch["weights"].sum() > 0


def test_tfds_imdb_classification_and_mnist_images():
  with tfds.testing.mock_data(num_examples=5):
    imdb = sources.get_source("imdb_reviews", "train")
    batch = next(pipeline.classification_pipeline(
        imdb, TOK, seq_len=12, batch_size=4, seed=0, num_epochs=1))
    assert batch["inputs"].shape == (4, 12) and batch["labels"].shape == (4,)
    np.testing.assert_array_equal(batch["inputs"][:, 0], TOK.cls_id)
    mnist = sources.get_source("mnist", "test")
    batches = list(pipeline.image_pipeline(mnist, batch_size=4, seed=0, num_epochs=1))
    assert [b["weights"].sum() for b in batches] == [4.0, 1.0]
    assert batches[0]["image"].shape == (4, 28, 28, 1)
    assert batches[0]["image"].dtype == np.float32
    wmt = sources.get_source("wmt14_translate/de-en", "train")
    batch = next(pipeline.seq2seq_pipeline(wmt, TOK, source_key="de", target_key="en",
                                           source_len=8, target_len=8, batch_size=2,
                                           seed=0))
    assert batch["targets"].shape == (2, 8)


def test_missing_data_dir_says_how_to_prepare(tmp_path):
  with pytest.raises(ValueError) as info:
    sources.tfds_source("tiny_shakespeare", "train", data_dir=str(tmp_path))
  message = str(info.value)
  assert "no prepared data" in message
  assert "tfds build tiny_shakespeare --file_format=array_record" in message
  assert str(tmp_path) in message


def test_text_files_source(tmp_path):
  (tmp_path / "sub").mkdir()
  (tmp_path / "b.txt").write_bytes("héllo".encode())
  (tmp_path / "sub" / "a.txt").write_bytes(b"world")
  (tmp_path / "c.md").write_bytes(b"md")
  folder = sources.text_files_source(str(tmp_path))
  assert [folder[i]["text"] for i in range(len(folder))] == [
      "héllo".encode(), b"md", b"world"]
  globbed = sources.text_files_source(str(tmp_path / "**" / "*.txt"))
  assert len(globbed) == 2
  single = sources.text_files_source(tmp_path / "c.md")
  assert single[0] == {"text": b"md"}
  with pytest.raises(ValueError, match="matches no files"):
    sources.text_files_source(str(tmp_path / "*.nothing"))


def test_registry():
  assert len(sources.get_source("stdlib_text", "validation")) > 0
  with pytest.raises(ValueError, match="data.source='nope' is not a known source"):
    sources.get_source("nope")


def test_text_files_split_by_document(tmp_path):
  for i in range(10):
    (tmp_path / f"{i}.txt").write_bytes(b"doc %d" % i)
  train = sources.get_source("text_files", "train", path=str(tmp_path),
                             validation_fraction=0.2)
  validation = sources.get_source("text_files", "validation", path=str(tmp_path),
                                  validation_fraction=0.2)
  assert [train[i]["text"] for i in range(len(train))] == [b"doc %d" % i
                                                           for i in range(8)]
  assert [validation[i]["text"] for i in range(2)] == [b"doc 8", b"doc 9"]
  assert list(validation.texts()) == [b"doc 8", b"doc 9"]
  with pytest.raises(ValueError, match="data.source_options.path is not set"):
    sources.get_source("text_files", "train", path=None)
  with pytest.raises(ValueError, match="validation_fraction=1.5"):
    sources.get_source("text_files", "train", path=str(tmp_path),
                       validation_fraction=1.5)


def test_one_file_is_split_by_its_tail_and_read_as_random_windows(tmp_path):
  text = "".join(f"line {i} é\n" for i in range(200)).encode()
  (tmp_path / "book.txt").write_bytes(text)
  kw = dict(path=str(tmp_path / "book.txt"), validation_fraction=0.1,
            window_bytes=16, seed=3)
  train = sources.get_source("text_files", "train", **kw)
  validation = sources.get_source("text_files", "validation", **kw)
  head, tail = next(train.texts()), next(validation.texts())
  assert head + tail == text and abs(len(tail) - 0.1 * len(text)) < 4
  tail.decode("utf-8")  # cut on a character boundary
  # validation: the tail's consecutive windows, in order
  assert b"".join(validation[i]["text"] for i in range(len(validation))) == tail
  # train: random windows of the head, the same for the same index and seed
  windows = [train[i]["text"] for i in range(50)]
  assert all(len(w) == 16 and w in head for w in windows)
  assert windows == [train[i]["text"] for i in range(50)]
  starts = [head.index(w) for w in windows]
  assert len(set(starts)) > 25 and starts != sorted(starts)  # not read in order
  assert len(train) > 10**6


def test_line_kind_source():
  assert [line_kinds.line_kind(x) for x in
          (b"# hi", b"def f():", b"class A:", b"x = 1", b"")] == [0, 1, 1, 2, None]
  source = sources.get_source("stdlib_line_kinds", "validation", num_examples=30,
                              max_files=20)
  assert len(source) == 30
  for i in range(30):
    record = source[i]
    assert record["label"] == i % 3
    assert line_kinds.line_kind(record["text"]) == i % 3
  assert source[4] == source[4]
  with pytest.raises(IndexError):
    source[30]


def test_line_kind_source_can_strip_the_markers():
  assert [line_kinds.strip_marker(x, line_kinds.line_kind(x)) for x in
          (b"## hi there", b"def f(x):", b"class A(B):", b"async def g():", b"x = 1")
          ] == [b"hi there", b"f(x):", b"A(B):", b"g():", b"x = 1"]
  plain = sources.get_source("stdlib_line_kinds", "validation", num_examples=60,
                             max_files=20)
  source = sources.get_source("stdlib_line_kinds", "validation", num_examples=60,
                              max_files=20, strip_markers=True)
  for i in range(60):
    record = source[i]
    assert record["label"] == i % 3 and record["text"]
    if i % 3 < 2:   # no comment or definition starts with its marker any more
      assert not record["text"].startswith((b"#", b"def ", b"class ", b"async def "))
  assert [source[i]["text"] for i in range(2, 60, 3)] == [
      plain[i]["text"] for i in range(2, 60, 3)]   # other code is unchanged


def test_synthetic_sources_deterministic():
  a = sources.get_source("reversal", "train", num_examples=50, seed=1)
  b = synthetic.reversal_source("train", num_examples=50, seed=1)
  c = synthetic.reversal_source("validation", num_examples=50, seed=1)
  for i in range(50):
    assert a[i] == b[i]
    assert a[i]["target"] == a[i]["source"][::-1]
    assert 4 <= len(a[i]["source"]) <= 12
  assert [a[i] for i in range(50)] != [c[i] for i in range(50)]
  shapes = synthetic.shapes_source("train", num_examples=300, image_size=8)
  labels = np.array([shapes[i]["label"] for i in range(300)])
  assert set(labels.tolist()) == set(range(len(synthetic.SHAPES)))
  image = shapes[0]["image"]
  assert image.shape == (8, 8, 1) and image.dtype == np.uint8
  np.testing.assert_array_equal(
      image, synthetic.shapes_source("train", num_examples=300)[0]["image"])
  # Each class has its own mean picture: class means differ clearly.
  means = np.stack([np.mean([shapes[i]["image"] for i in np.flatnonzero(labels == k)],
                            axis=0) for k in range(len(synthetic.SHAPES))])
  dist = np.abs(means[:, None] - means[None]).mean(axis=(2, 3, 4))
  assert dist[~np.eye(len(means), dtype=bool)].min() > 5
  with pytest.raises(ValueError, match="split must be one of"):
    synthetic.shapes_source("dev")
