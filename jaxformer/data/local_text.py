"""Your own text: local files, a folder or a glob, split into train and validation.

:class:`TextFilesSource` serves every matched file as one ``{"text": bytes}`` record.
:func:`text_split_source` is what a config reaches (``data.source="text_files"``,
``data.source_options.path=...``): the same files with a stated
``validation_fraction`` held out.

* Several files: split by document. The files are sorted by path and the last
  ``round(validation_fraction * n)`` of them (at least one) are the validation split.
* One file: split by its tail. The last ``validation_fraction`` of its bytes are the
  validation split. The causal LM reads each split as one token stream
  (:mod:`jaxformer.data.token_windows`, nanoGPT's way: random windows of
  ``seq_len + 1`` tokens, :attr:`TextWindowsSource.text`). As records (other tasks),
  a single long file is not read in order: a train record is a window of
  ``window_bytes`` bytes at a random offset (record ``i`` drawn with
  ``default_rng([seed, i])``, so the source stays random access and resumable), and
  the validation records are the tail's consecutive windows, in order.
"""

from __future__ import annotations

import codecs
import glob as glob_lib
import os
from collections.abc import Iterator
from typing import Any

import numpy as np

SPLITS = ("train", "validation")
# Train windows of one file: enough records for any run (they are drawn, not stored).
NUM_WINDOWS = 1 << 30


def match_files(path_or_glob: str | os.PathLike[str]) -> tuple[str, ...]:
  """The files of a file, a directory (all files under it) or a glob, sorted."""
  if not os.fspath(path_or_glob):
    raise ValueError("path is not set: give a text file, a folder or a glob, "
                     "e.g. --config.data.source_options.path='~/books/*.txt'")
  pattern = os.path.expanduser(os.fspath(path_or_glob))
  if os.path.isdir(pattern):
    paths = [os.path.join(root, f) for root, _, files in os.walk(pattern)
             for f in files]
  elif os.path.isfile(pattern):
    paths = [pattern]
  else:
    paths = [p for p in glob_lib.glob(pattern, recursive=True) if os.path.isfile(p)]
  if not paths:
    raise ValueError(f"path={os.fspath(path_or_glob)!r} matches no files.")
  return tuple(sorted(paths))


def decode_text(data: bytes, name: str, *, encoding: str = "utf-8",
                how: str = "") -> str:
  """``data`` decoded as ``encoding``; a ValueError naming ``name``, the byte offset and
  the byte when it is not valid text there (a binary file, or another encoding).

  ``how`` says how to proceed (e.g. which option picks another encoding).
  """
  try:
    return data.decode(encoding)
  except UnicodeDecodeError as e:
    bad = data[e.start:e.start + 1].hex()
    binary = "; it looks binary (it has NUL bytes)" if b"\0" in data[:8192] else ""
    raise ValueError(
        f"{name} is not {encoding} text: byte 0x{bad} at offset {e.start} ({e.reason})"
        + binary + (f"; {how}" if how else "")) from None


def read_text(path: str | os.PathLike[str], *, encoding: str = "utf-8",
              how: str = "") -> str:
  """The text of the file ``path`` (see :func:`decode_text` for the error)."""
  with open(path, "rb") as f:
    return decode_text(f.read(), os.fspath(path), encoding=encoding, how=how)


# How to proceed when a text tokenizer meets a file that is not UTF-8.
HOW_TEXT = ("set data.source_options.encoding to the file's encoding (e.g. "
            "'latin-1'), or use data.tokenizer='bytes' to train on its bytes")


def _read(path: str, encoding: str | None = None) -> bytes:
  """The file's bytes; with ``encoding``, its text in that encoding as UTF-8 bytes."""
  with open(path, "rb") as f:
    data = f.read()
  if encoding is None:
    return data
  return decode_text(data, path, encoding=encoding,
                     how=f"data.source_options.encoding={encoding!r} is not its "
                     "encoding"
                     ).encode("utf-8")


def check_utf8(path_or_glob: str | os.PathLike[str]) -> None:
  """ValueError naming the first matched file that is not UTF-8 text, its byte offset
  and how to proceed (:data:`HOW_TEXT`): what a text tokenizer (``chars``,
  ``sentencepiece``) needs, checked before step 1."""
  for path in match_files(path_or_glob):
    with open(path, "rb") as f:
      decode_text(f.read(), path, how=HOW_TEXT)


class TextFilesSource:
  """Local text files as ``{"text": bytes}`` records, one per file (sorted paths).

  Attributes:
    paths: the files read, sorted.
  """

  def __init__(self, path_or_glob: str | os.PathLike[str], *,
               paths: tuple[str, ...] | None = None, encoding: str | None = None):
    """Args:
      path_or_glob: a file, a directory (all files under it) or a glob.
      paths: only these of its files (a split); None = all.
      encoding: the files' text encoding: records are then their text as UTF-8
        bytes; None: the files' bytes as they are.
    """
    self.pattern = os.fspath(path_or_glob)
    self.paths = match_files(path_or_glob) if paths is None else tuple(paths)
    self.encoding = encoding

  def __len__(self) -> int:
    return len(self.paths)

  def __getitem__(self, index: int) -> dict[str, Any]:
    return {"text": _read(self.paths[int(index)], self.encoding)}

  def texts(self) -> Iterator[bytes]:
    """Every record's text, in order (to fit a vocabulary)."""
    for path in self.paths:
      yield _read(path, self.encoding)

  def __repr__(self) -> str:
    return f"TextFilesSource({self.pattern!r}, files={len(self.paths)})"


class TextWindowsSource:
  """Windows of one text: random ones (train) or consecutive ones (validation)."""

  def __init__(self, text: bytes, *, name: str, window_bytes: int, shuffle: bool,
               seed: int = 0):
    if isinstance(window_bytes, bool) or not isinstance(window_bytes, int) or (
        window_bytes < 1):
      raise ValueError(f"data.source_options.window_bytes={window_bytes!r} must be "
                       "an int >= 1")
    self._text = text
    self._name = name
    self._window = min(window_bytes, max(len(text), 1))
    self._shuffle = shuffle
    self._seed = seed

  def __len__(self) -> int:
    if self._shuffle:
      return NUM_WINDOWS if self._text else 0
    return -(-len(self._text) // self._window)

  def __getitem__(self, index: int) -> dict[str, Any]:
    index = int(index)
    if not 0 <= index < len(self):
      raise IndexError(f"index {index} out of range for {len(self)} windows")
    if self._shuffle:
      last = len(self._text) - self._window
      start = int(np.random.default_rng([self._seed, index]).integers(last + 1))
    else:
      start = index * self._window
    return {"text": self._text[start:start + self._window]}

  @property
  def text(self) -> bytes:
    """The whole split (the causal LM reads it as one token stream)."""
    return self._text

  def texts(self) -> Iterator[bytes]:
    yield self._text

  def __repr__(self) -> str:
    return f"TextWindowsSource({self._name!r}, bytes={len(self._text)})"


def _tail_start(text: bytes, fraction: float) -> int:
  """Where the last ``fraction`` of ``text`` starts, moved back to a UTF-8 boundary."""
  cut = len(text) - int(round(fraction * len(text)))
  while 0 < cut < len(text) and (text[cut] & 0xC0) == 0x80:  # continuation byte
    cut -= 1
  return cut


def split_sizes(paths: tuple[str, ...], validation_fraction: float) -> tuple[int, int]:
  """``(train bytes, validation bytes)`` of the split of ``paths`` (of one file: from
  its size, before the cut moves back to a UTF-8 boundary, by up to 3 bytes)."""
  sizes = [os.path.getsize(p) for p in paths]
  if len(sizes) == 1:
    validation = int(round(validation_fraction * sizes[0]))
    return sizes[0] - validation, validation
  num_validation = min(max(int(round(validation_fraction * len(sizes))), 1),
                       len(sizes) - 1)
  cut = len(sizes) - num_validation
  return sum(sizes[:cut]), sum(sizes[cut:])


def check_options(path: str | None, validation_fraction: float,
                  encoding: str | None = None, *, min_validation_bytes: int = 1,
                  **unused: Any) -> tuple[str, ...]:
  """The files of ``path``; ValueError naming ``data.source_options.path``,
  ``.validation_fraction`` or ``.encoding`` when they cannot give a split, or
  a train split of at least one byte and a validation split of at least
  ``min_validation_bytes`` (e.g. one sequence: less would be evaluated over the same
  few bytes repeated)."""
  del unused
  if encoding is not None:
    try:
      codecs.lookup(encoding)
    except (LookupError, TypeError):
      raise ValueError(f"data.source_options.encoding={encoding!r} is not a text "
                       "encoding Python knows (e.g. 'utf-8', 'latin-1', 'cp1252')"
                       ) from None
  if not isinstance(validation_fraction, (int, float)) or not (
      0 < validation_fraction < 1):
    raise ValueError("data.source_options.validation_fraction="
                     f"{validation_fraction!r} must be in (0, 1)")
  try:
    files = match_files(path or "")
  except ValueError as e:
    raise ValueError(f"data.source_options.{e}") from None
  train, validation = split_sizes(files, validation_fraction)
  if train < 1 or validation < max(min_validation_bytes, 1):
    what = (f"{len(files)} files" if len(files) > 1
            else f"{train + validation:,} byte(s)")
    need = (f"at least {min_validation_bytes:,} bytes (one window of data.seq_len + 1 "
            "tokens) to evaluate on"
            if min_validation_bytes > 1 else "text in both splits")
    raise ValueError(
        f"data.source_options.path={path!r}: {what} split at validation_fraction="
        f"{validation_fraction} leave {train:,} bytes to train on and {validation:,} "
        f"to validate on; it needs {need}: give more text, or raise "
        "data.source_options.validation_fraction")
  return files


def text_split_source(split: str, *, path: str | None,
                      validation_fraction: float = 0.05, window_bytes: int = 1024,
                      seed: int = 0, encoding: str | None = None):
  """The ``split`` of the text at ``path`` (see the module docstring).

  Args:
    split: ``"train"`` or ``"validation"``.
    path: a file, a directory or a glob (``data.source_options.path``).
    validation_fraction: in (0, 1): the share of documents (several files) or of
      bytes (one file) held out.
    window_bytes: bytes per record when reading one file.
    seed: draws the train windows of one file.
    encoding: the files' text encoding (``data.source_options.encoding``): records
      are their text re-encoded as UTF-8; None: their bytes as they are.
  Returns:
    A random-access source of ``{"text": bytes}`` with a ``texts()`` method.
  """
  if split not in SPLITS:
    raise ValueError(f"data split {split!r} is not one of {SPLITS} for "
                     "data.source='text_files'")
  files = TextFilesSource(path, paths=check_options(path, validation_fraction, encoding),
                          encoding=encoding)
  if len(files) == 1:
    text = _read(files.paths[0], encoding)
    cut = _tail_start(text, validation_fraction)
    part = text[:cut] if split == "train" else text[cut:]
    if not part:
      raise ValueError(f"data.source_options.path={path!r}: {len(text)} bytes leave "
                       f"no {split} text at validation_fraction={validation_fraction}")
    return TextWindowsSource(part, name=f"{files.paths[0]}:{split}",
                             window_bytes=window_bytes, shuffle=split == "train",
                             seed=seed)
  num_validation = min(max(int(round(validation_fraction * len(files))), 1),
                       len(files) - 1)
  cut = len(files) - num_validation
  paths = files.paths[:cut] if split == "train" else files.paths[cut:]
  return TextFilesSource(path, paths=paths, encoding=encoding)
