"""The data fingerprint: file sizes and content hashes (sampled blocks for large files),
the tokenizer's vocabulary, and the resume check built on it."""

from __future__ import annotations

import pytest

from jaxformer.data import fingerprint as fp_lib
from jaxformer.data import tokenizers as tok_lib


def _section(path):
  return {"source": "text_files", "source_options": {"path": str(path)}}


def test_fingerprint_names_each_changed_file(tmp_path):
  (tmp_path / "a.txt").write_text("alpha " * 10)
  (tmp_path / "b.txt").write_text("beta " * 10)
  tok = tok_lib.CharTokenizer("abehlpt ")
  first = fp_lib.fingerprint(_section(tmp_path), tok)
  assert [f["size"] for f in first["files"]] == [60, 50]
  assert first == fp_lib.fingerprint(_section(tmp_path), tok_lib.CharTokenizer(
      "abehlpt "))  # deterministic
  (tmp_path / "a.txt").write_text("ALPHA " * 10)           # same size, new text
  (tmp_path / "b.txt").write_text("beta " * 11)            # grown
  (tmp_path / "c.txt").write_text("gamma")                 # new file
  now = fp_lib.fingerprint(_section(tmp_path), tok_lib.CharTokenizer("abehlpt"))
  a, b, c = (str(tmp_path / n) for n in ("a.txt", "b.txt", "c.txt"))
  assert fp_lib.differences(first, now) == [
      f"{a}: content changed (same size)", f"{b}: 50 -> 55 bytes", f"{c}: new (5 bytes)",
      "the tokenizer's vocabulary changed"]
  with pytest.raises(ValueError, match=(
      r"the data changed since checkpoint 3: .*a.txt: content changed \(same size\); "
      r".*Resuming would train on other data than the run so far: use another "
      r"--workdir, restore the data, or allow it with --config.train.allow_config_"
      r"changes='\(\"data\",\)'")):
    fp_lib.check_resume(first, now, (), where="checkpoint 3")
  for allowed in (("data",), ("data.fingerprint",)):
    assert len(fp_lib.check_resume(first, now, allowed, where="x")) == 4
  assert fp_lib.check_resume(None, now, (), where="an old checkpoint") == []
  assert fp_lib.check_resume(now, now, (), where="x") == []


def test_large_files_hash_sampled_blocks(tmp_path, monkeypatch):
  monkeypatch.setattr(fp_lib, "WHOLE_FILE_BYTES", 1000)
  monkeypatch.setattr(fp_lib, "BLOCK_BYTES", 10)
  monkeypatch.setattr(fp_lib, "SAMPLED_BLOCKS", 3)   # bytes 0-9, 495-504, 990-999
  path = tmp_path / "big.txt"
  data = bytearray(b"x" * 2000)
  path.write_bytes(bytes(data))
  base = fp_lib.file_digest(str(path))
  for offset, seen in ((0, True), (1999, True), (999, True), (100, False)):
    changed = bytearray(data)
    changed[offset] = ord("y")
    path.write_bytes(bytes(changed))
    assert (fp_lib.file_digest(str(path)) != base) == seen, offset


def test_many_files_and_the_standard_library_are_summarised(tmp_path, monkeypatch):
  monkeypatch.setattr(fp_lib, "MAX_LISTED", 2)
  for name in "abc":
    (tmp_path / f"{name}.txt").write_text(name * 4)
  many = fp_lib.fingerprint(_section(tmp_path))
  assert many["files"]["count"] == 3 and many["files"]["size"] == 12
  (tmp_path / "d.txt").write_text("d")
  assert fp_lib.differences(many, fp_lib.fingerprint(_section(tmp_path))) == [
      "the data files changed (3 files, 12 bytes -> 4 files, 13 bytes)"]
  stdlib = fp_lib.fingerprint({"source": "stdlib_text"}, tok_lib.ByteTokenizer())
  assert stdlib["files"]["count"] > 100 and stdlib["tokenizer"]
  assert fp_lib.fingerprint({"source": "reversal"}) == {"files": [], "tokenizer": None}
