"""The embedded standard-library source: deterministic, non-empty, disjoint splits."""

from __future__ import annotations

import sysconfig

import pytest

from jaxformer.data import embedded


def test_splits_disjoint_nonempty_and_sorted():
  train = embedded.stdlib_text_source("train")
  valid = embedded.stdlib_text_source("validation")
  assert len(train) > 100 and len(valid) > 0
  assert not set(train.paths) & set(valid.paths)
  assert list(train.paths) == sorted(train.paths)
  fraction = len(valid) / (len(train) + len(valid))
  assert 0.005 < fraction < 0.05
  assert train.num_bytes() + valid.num_bytes() <= embedded.MAX_TOTAL_BYTES
  for path in train.paths + valid.paths:
    assert path.endswith(".py")
    parts = path.split("/")
    assert not {"site-packages", "test", "tests", "__pycache__"} & set(parts[:-1])


def test_records_are_bytes_and_deterministic():
  a = embedded.stdlib_text_source("train")
  b = embedded.stdlib_text_source("train", root=sysconfig.get_paths()["stdlib"])
  assert a.paths == b.paths
  assert embedded.fingerprint(a) == embedded.fingerprint(b)
  assert embedded.fingerprint(a) != embedded.fingerprint(
      embedded.stdlib_text_source("validation"))
  record = a[len(a) // 2]
  assert set(record) == {"text"} and isinstance(record["text"], bytes)
  assert record == b[len(b) // 2]
  assert a[-1] == a[len(a) - 1]
  with pytest.raises(IndexError):
    a[len(a)]
  assert any(b"def " in a[i]["text"] for i in range(10, 20))


def test_split_depends_only_on_path(tmp_path):
  for name in ["a.py", "b.py", "pkg/c.py", "test/skip.py", "site-packages/x/y.py",
               "_sysconfigdata_x.py", "notes.txt"]:
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"# {name}\n")
  train = embedded.stdlib_text_source("train", root=str(tmp_path))
  assert set(train.paths) == {"a.py", "b.py", "pkg/c.py"}  # none hashes to validation
  assert train[2] == {"text": b"# pkg/c.py\n"}


def test_bad_split():
  with pytest.raises(ValueError, match="split must be one of"):
    embedded.stdlib_text_source("test")
