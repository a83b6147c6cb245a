"""What a run trained on, in a few hundred bytes: its data files and its tokenizer.

A checkpoint stores the :func:`fingerprint` of its data so that a resume on changed data
is an error (:func:`check_resume`) rather than a silent switch to other text; the
config alone cannot tell (``data.path`` names a file, not its content).

* files: every file a local source reads (``text_files``: the matched files), each with
  its size and a content hash: the whole file up to :data:`WHOLE_FILE_BYTES`, else
  :data:`SAMPLED_BLOCKS` blocks of :data:`BLOCK_BYTES` spread evenly over it, first and
  last included (cheap on any size; a change between the blocks that keeps the size
  is missed). ``stdlib_text``: the Python version and the files' names and sizes.
* tokenizer: a hash of its class and every id's piece (a changed vocabulary).

Sources with no local files (TFDS, synthetic) are described by the config alone.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
from collections.abc import Iterable, Mapping
from typing import Any

from jaxformer.data import embedded
from jaxformer.data import local_text

WHOLE_FILE_BYTES = 1 << 20
BLOCK_BYTES = 1 << 16
SAMPLED_BLOCKS = 16
# Files listed one by one in a fingerprint (more: a count, a size and one hash).
MAX_LISTED = 64
# train.allow_config_changes names this (or "data") to resume on changed data.
KEY = "data.fingerprint"


def file_digest(path: str, size: int | None = None) -> str:
  """sha256 (16 hex digits) of the file, or of its sampled blocks when large."""
  size = os.path.getsize(path) if size is None else size
  h = hashlib.sha256()
  with open(path, "rb") as f:
    if size <= WHOLE_FILE_BYTES:
      h.update(f.read())
    else:
      for i in range(SAMPLED_BLOCKS):
        f.seek((size - BLOCK_BYTES) * i // (SAMPLED_BLOCKS - 1))
        h.update(f.read(BLOCK_BYTES))
  return h.hexdigest()[:16]


def _fields(section: Any) -> Mapping[str, Any]:
  """A ``DataConfig`` (or a plain ``data`` mapping) as a mapping of its fields."""
  if dataclasses.is_dataclass(section):
    return {f.name: getattr(section, f.name) for f in dataclasses.fields(section)}
  return section


def data_files(section: Any) -> list[tuple[str, str]]:
  """``(name, path)`` of the local files ``config.data`` reads and hashes ([] for
  sources without files, and the standard library: see :func:`_stdlib`)."""
  section = _fields(section)
  options = dict(section.get("source_options") or {})
  source = section.get("source")
  if source == "text_files":
    return [(p, p) for p in local_text.match_files(options.get("path") or "")]
  return []


def _stdlib(section: Mapping[str, Any]) -> dict[str, Any]:
  """The standard library's files summarised by their names and sizes (not read: they
  change only with the Python version, which is part of the summary)."""
  options = dict(section.get("source_options") or {})
  count, size, h = 0, 0, hashlib.sha256(str(sys.version_info[:3]).encode())
  for split in dict.fromkeys((section.get("train_split", "train"),
                              section.get("eval_split") or "validation")):
    src = embedded.stdlib_text_source(split, **options)
    count, size = count + len(src.paths), size + src.num_bytes()
    h.update(embedded.fingerprint(src).encode())
  return {"count": count, "size": size, "sha256": h.hexdigest()[:16]}


def tokenizer_digest(tokenizer: Any) -> str | None:
  """sha256 (16 hex digits) of the tokenizer's class and each id's piece."""
  if tokenizer is None:
    return None
  pieces = [tokenizer.decode([i], skip_special=False)
            for i in range(tokenizer.vocab_size)]
  blob = json.dumps([type(tokenizer).__name__, pieces], ensure_ascii=False)
  return hashlib.sha256(blob.encode("utf-8", errors="surrogatepass")).hexdigest()[:16]


def fingerprint(section: Any, tokenizer: Any = None) -> dict[str, Any]:
  """``{"files": [{"path", "size", "sha256"}, ...], "tokenizer": hash}`` (JSON data);
  above :data:`MAX_LISTED` files, ``"files"`` is their count, total size and one hash
  of all the entries instead."""
  section = _fields(section)
  if section.get("source") == "stdlib_text":
    return {"files": _stdlib(section), "tokenizer": tokenizer_digest(tokenizer)}
  files = []
  for name, path in data_files(section):
    size = os.path.getsize(path)
    files.append({"path": name, "size": size, "sha256": file_digest(path, size)})
  if len(files) > MAX_LISTED:
    blob = json.dumps(files, sort_keys=True).encode("utf-8")
    files = {"count": len(files), "size": sum(f["size"] for f in files),
             "sha256": hashlib.sha256(blob).hexdigest()[:16]}
  return {"files": files, "tokenizer": tokenizer_digest(tokenizer)}


def _summary(files: Any) -> tuple[int, int]:
  if isinstance(files, dict):
    return files["count"], files["size"]
  return len(files), sum(f["size"] for f in files)


def differences(stored: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
  """What changed from ``stored`` to ``current``, one phrase per file (and tokenizer)."""
  old, new = stored.get("files", []), current.get("files", [])
  out = []
  if isinstance(old, dict) or isinstance(new, dict):  # many files: a summary each
    if old != new:
      (n0, b0), (n1, b1) = _summary(old), _summary(new)
      out.append(f"the data files changed ({n0:,} files, {b0:,} bytes -> {n1:,} "
                 f"files, {b1:,} bytes)")
  else:
    old = {f["path"]: f for f in old}
    new = {f["path"]: f for f in new}
    for path in sorted(set(old) | set(new)):
      if path not in new:
        out.append(f"{path}: gone")
      elif path not in old:
        out.append(f"{path}: new ({new[path]['size']:,} bytes)")
      elif old[path]["size"] != new[path]["size"]:
        out.append(f"{path}: {old[path]['size']:,} -> {new[path]['size']:,} bytes")
      elif old[path]["sha256"] != new[path]["sha256"]:
        out.append(f"{path}: content changed (same size)")
  if stored.get("tokenizer") != current.get("tokenizer"):
    out.append("the tokenizer's vocabulary changed")
  return out


def check_resume(stored: Mapping[str, Any] | None, current: Mapping[str, Any],
                 allowed: Iterable[str], *, where: str) -> list[str]:
  """The data changes since the checkpoint ``where`` (``[]``: none, or a checkpoint
  without a fingerprint); a ValueError naming them unless ``allowed`` (the run's
  ``train.allow_config_changes``) names ``data`` or ``data.fingerprint``."""
  if not stored:
    return []
  changes = differences(stored, current)
  if changes and not any(KEY == n or KEY.startswith(n + ".") for n in allowed):
    shown = "; ".join(changes[:5]) + (f"; and {len(changes) - 5} more"
                                      if len(changes) > 5 else "")
    raise ValueError(
        f"the data changed since {where}: {shown}. Resuming would train on other data "
        "than the run so far: use another --workdir, restore the data, or allow it "
        "with --config.train.allow_config_changes='(\"data\",)'")
  return changes
