"""Text that is not UTF-8 never becomes U+FFFD silently: a text tokenizer (chars,
sentencepiece) on such a file stops before step 1 naming the file, the byte offset and
how to proceed; ``data.source_options.encoding`` reads it as text in that encoding."""

from __future__ import annotations

import pytest

from jaxformer.data import local_text
from jaxformer.data import vocab

LATIN1 = "Un café naïf, déjà vu.\n" * 20


def _section(path, tokenizer="chars", encoding=None):
  options = dict(path=str(path), validation_fraction=0.1, window_bytes=32, seed=0)
  if encoding is not None:
    options["encoding"] = encoding
  return dict(source="text_files", tokenizer=tokenizer, train_split="train",
              source_options=options)


@pytest.mark.parametrize("tokenizer", ["chars", "sentencepiece"])
def test_text_tokenizer_on_latin1_or_binary_names_file_and_offset(tmp_path, tokenizer):
  path = tmp_path / "latin1.txt"
  path.write_bytes(LATIN1.encode("latin-1"))
  with pytest.raises(ValueError, match=(
      r"latin1.txt is not utf-8 text: byte 0xe9 at offset 6 \(invalid continuation "
      r"byte\); set data.source_options.encoding to the file's encoding \(e.g. "
      r"'latin-1'\), or use data.tokenizer='bytes' to train on its bytes")):
    vocab.build_tokenizer(_section(path, tokenizer), str(tmp_path / "run"))
  binary = tmp_path / "data.bin"
  binary.write_bytes(bytes(range(256)) * 4)
  with pytest.raises(ValueError, match=r"data.bin is not utf-8 text: byte 0x80 at "
                     r"offset 128 .*; it looks binary"):
    vocab.build_tokenizer(_section(binary, tokenizer), str(tmp_path / "run"))
  assert vocab.build_tokenizer(_section(binary, "bytes")).vocab_size == 263


def test_encoding_reads_the_text_as_utf8(tmp_path):
  path = tmp_path / "latin1.txt"
  path.write_bytes(LATIN1.encode("latin-1"))
  tok = vocab.build_tokenizer(_section(path, encoding="latin-1"), str(tmp_path / "run"))
  assert {"é", "ï", "à"} <= set(tok.chars) and "\ufffd" not in tok.chars
  train = local_text.text_split_source("train", path=str(path), encoding="latin-1",
                                       validation_fraction=0.1, window_bytes=1 << 20)
  assert next(train.texts()).decode("utf-8") == LATIN1[:len(next(train.texts())
                                                              .decode("utf-8"))]
  valid = local_text.text_split_source("validation", path=str(path), encoding="latin-1",
                                       validation_fraction=0.1, window_bytes=1 << 20)
  assert (next(train.texts()) + next(valid.texts())).decode("utf-8") == LATIN1
  with pytest.raises(ValueError, match="data.source_options.encoding='latin-9000' is "
                     "not a text encoding Python knows"):
    local_text.check_options(str(path), 0.1, encoding="latin-9000")
  with pytest.raises(ValueError, match=r"is not ascii text: byte 0xe9 at offset 6 .*"
                     r"data.source_options.encoding='ascii' is not its encoding"):
    local_text.text_split_source("train", path=str(path), encoding="ascii")


def test_unknown_characters_are_counted_and_refused_above_the_limit(tmp_path):
  path = tmp_path / "book.txt"
  path.write_text("abcab" * 200 + "Z", encoding="utf-8")  # Z: validation only
  section = _section(path)
  section["eval_split"] = "validation"
  tok = vocab.build_tokenizer(section, str(tmp_path / "run"))
  assert "Z" not in tok.chars
  assert vocab.check_coverage(tok, section) == (
      "1 unknown characters (0.100%: 'Z' x1)")
  path.write_text("abcab" * 100 + "xyzzy" * 100, encoding="utf-8")  # other text
  with pytest.raises(ValueError, match=(
      r"500 of 1,000 characters \(50.00%\) of the train and validation text are not "
      r"in the run's character vocabulary \('y' x200, 'z' x200, 'x' x100\), above the "
      r"1% limit: they would all become \[UNK\]")):
    vocab.check_coverage(vocab.build_tokenizer(section, str(tmp_path / "run")), section)
  assert vocab.check_coverage(vocab.build_tokenizer(_section(path, "bytes")),
                              section) == ""


def test_splits_too_small_to_train_or_evaluate_are_refused_up_front(tmp_path):
  one, twelve = tmp_path / "one.txt", tmp_path / "twelve.txt"
  one.write_text("x")
  twelve.write_text("hello world!")
  with pytest.raises(ValueError, match=r"one.txt': 1 byte\(s\) split at "
                     r"validation_fraction=0.05 leave 1 bytes to train on and 0 to "
                     r"validate on; it needs text in both splits"):
    local_text.check_options(str(one), 0.05)
  assert local_text.check_options(str(twelve), 0.05) == (str(twelve),)
  with pytest.raises(ValueError, match=r"12 byte\(s\) split .* leave 11 bytes to train "
                     r"on and 1 to validate on; it needs at least 16 bytes \(one "
                     r"window of data.seq_len \+ 1 tokens\) to evaluate on: give more "
                     r"text, or raise data.source_options.validation_fraction"):
    local_text.check_options(str(twelve), 0.05, min_validation_bytes=16)
  assert local_text.split_sizes((str(one), str(twelve)), 0.5) == (1, 12)


def test_gpt_text_config_passes_data_encoding_to_the_source(tmp_path):
  from experiments.configs import gpt_text  # pylint: disable=g-import-not-at-top
  c = gpt_text.get_config("tiny")
  assert c.data.source_options.encoding is None
  c.data.source_options.path = str(tmp_path / "latin1.txt")
  (tmp_path / "latin1.txt").write_bytes((LATIN1 * 4).encode("latin-1"))
  c.data.source_options.encoding = "latin-1"
  from jaxformer.data.config import DataConfig  # pylint: disable=g-import-not-at-top
  data = DataConfig.parse_shared(c.data)  # the option reaches the source's check
  assert data.source_options["encoding"] == "latin-1"
