"""The embedded default data set: the Python standard library's own ``.py`` files.

Every Python install carries these files, so the main experiments need no download.
Records are ``{"text": bytes}`` (the file's raw bytes), one per file, served by a
random-access source with the interface of ``tfds.data_source``.

What is included, deterministically:

* every ``*.py`` file under ``sysconfig.get_paths()["stdlib"]``, sorted by its POSIX
  path relative to that directory;
* excluded: ``site-packages``/``dist-packages`` (installed packages differ between
  machines), test directories (``test``, ``tests``, ``idle_test``), ``__pycache__`` and
  the build-specific ``_sysconfigdata_*`` modules and ``config-*`` directories;
* files are taken in sorted order until their total size would exceed
  ``MAX_TOTAL_BYTES`` (16 MB; CPython 3.11 has about 12 MB, 734 files, so nothing is
  cut there);
* the split is by file: a file is in ``"validation"`` iff the first 8 bytes of
  ``sha256(f"{SPLIT_SEED}:{relative_path}")`` read as an integer fall below
  ``VALIDATION_FRACTION`` (2%) of the range; everything else is ``"train"``. A file's
  split depends only on its own path, never on which other files exist.

The content depends on the Python version (minor and patch: the standard library
changes between releases), so the same Python version gives the same records on every
machine; :func:`fingerprint` summarises a source in one hash for logs.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import pathlib
import sys
import sysconfig
from typing import Any

MAX_TOTAL_BYTES = 16 * 1024 * 1024
VALIDATION_FRACTION = 0.02
SPLIT_SEED = 0
SPLITS = ("train", "validation")

_EXCLUDED_DIRS = frozenset(
    {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"})


def _excluded(rel: pathlib.PurePosixPath) -> bool:
  dirs = rel.parts[:-1]
  if any(d in _EXCLUDED_DIRS or d.startswith("config-") for d in dirs):
    return True
  return rel.name.startswith("_sysconfigdata")


def _is_validation(rel_path: str) -> bool:
  digest = hashlib.sha256(f"{SPLIT_SEED}:{rel_path}".encode()).digest()
  return int.from_bytes(digest[:8], "big") < VALIDATION_FRACTION * 2**64


@functools.lru_cache(maxsize=None)
def _file_list(root: str) -> tuple[tuple[str, int], ...]:
  """(relative posix path, size) of the included files, sorted, size-capped."""
  base = pathlib.Path(root)
  rels = []
  for dirpath, dirnames, filenames in os.walk(base):
    # Prune excluded directories so that site-packages is never walked.
    dirnames[:] = [d for d in dirnames
                   if d not in _EXCLUDED_DIRS and not d.startswith("config-")]
    rel_dir = pathlib.Path(dirpath).relative_to(base).as_posix()
    for name in filenames:
      rel = pathlib.PurePosixPath(rel_dir, name)
      if name.endswith(".py") and not _excluded(rel):
        rels.append(rel.as_posix())
  rels.sort()
  out, total = [], 0
  for rel in rels:
    size = (base / rel).stat().st_size
    if total + size > MAX_TOTAL_BYTES:
      break
    out.append((rel, size))
    total += size
  return tuple(out)


@dataclasses.dataclass(frozen=True)
class StdlibTextSource:
  """Random-access source of standard-library files: ``source[i] -> {"text": bytes}``.

  Attributes:
    root: the standard library directory read.
    split: "train" or "validation".
    paths: the files of this split, relative to ``root``, sorted.
  """

  root: str
  split: str
  paths: tuple[str, ...]

  def __len__(self) -> int:
    return len(self.paths)

  def __getitem__(self, index: int) -> dict[str, Any]:
    index = int(index)
    if not -len(self.paths) <= index < len(self.paths):
      raise IndexError(f"index {index} out of range for {len(self.paths)} records.")
    with open(pathlib.Path(self.root) / self.paths[index], "rb") as f:
      return {"text": f.read()}

  def __repr__(self) -> str:
    return (f"StdlibTextSource(split={self.split!r}, files={len(self)}, "
            f"python={sys.version_info.major}.{sys.version_info.minor}."
            f"{sys.version_info.micro})")

  def num_bytes(self) -> int:
    """Total size of the files of this split."""
    return sum((pathlib.Path(self.root) / p).stat().st_size for p in self.paths)


def stdlib_text_source(split: str = "train", *,
                       root: str | None = None) -> StdlibTextSource:
  """The embedded default data set (see the module docstring).

  Args:
    split: "train" or "validation".
    root: the directory to read; default ``sysconfig.get_paths()["stdlib"]``.

  Returns:
    A random-access source whose records are ``{"text": bytes}``.
  """
  if split not in SPLITS:
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}.")
  root = root or sysconfig.get_paths()["stdlib"]
  want_validation = split == "validation"
  paths = tuple(rel for rel, _ in _file_list(root)
                if _is_validation(rel) == want_validation)
  if not paths:
    raise ValueError(f"No standard-library .py files found under {root!r} for split "
                     f"{split!r}.")
  return StdlibTextSource(root=root, split=split, paths=paths)


def fingerprint(source: StdlibTextSource) -> str:
  """A short hash of a source's file list and sizes, for logging runs."""
  sizes = dict(_file_list(source.root))
  h = hashlib.sha256()
  for rel in source.paths:
    h.update(f"{rel}\0{sizes[rel]}\n".encode())
  return h.hexdigest()[:16]
