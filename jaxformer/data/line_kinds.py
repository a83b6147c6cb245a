"""A small local text-classification set (no download) for tiny fine-tuning runs.

Lines of the embedded standard-library source labelled ``0`` comment, ``1`` definition
(``def``/``class``), ``2`` other code.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from jaxformer.data import embedded

LINE_KINDS = ("comment", "definition", "code")


def line_kind(line: bytes) -> int | None:
  """The :data:`LINE_KINDS` index of a stripped source line (None if empty)."""
  if not line:
    return None
  if line.startswith(b"#"):
    return 0
  if line.startswith((b"def ", b"class ", b"async def ")):
    return 1
  return 2


MARKERS = (b"async def ", b"def ", b"class ")


def strip_marker(line: bytes, kind: int) -> bytes:
  """``line`` without what gives its kind away: a comment's leading ``#``s, a
  definition's ``def`` / ``class`` / ``async def`` keyword (other code unchanged)."""
  if kind == 0:
    return line.lstrip(b"#").strip()
  if kind == 1:
    for marker in MARKERS:
      if line.startswith(marker):
        return line[len(marker):].strip()
  return line


class LineKindSource:
  """``{"text": bytes, "label": int}``: standard-library lines by kind (balanced).

  Record ``i`` has label ``i % 3`` and is a line of that kind drawn with
  ``default_rng([seed, i])`` from the embedded ``split`` (leading whitespace removed,
  cut to ``max_bytes``).

  Args:
    split: ``"train"`` or ``"validation"`` (the embedded source's split by file).
    num_examples: records in the source.
    max_files: read only the first files of the split (fast start).
    max_bytes: longest line kept.
    seed: drawing seed.
    strip_markers: remove the marker that decides the kind (:func:`strip_marker`:
      ``#``, ``def``, ``class``), so the first byte no longer gives the label away and
      a classifier has to read the rest of the line (prose vs a signature vs code);
      lines left empty are dropped. Some stripped comments are commented-out code, so
      the task is not perfectly separable.
  """

  def __init__(self, split: str = "train", *, num_examples: int = 30_000,
               max_files: int = 150, max_bytes: int = 120, seed: int = 0,
               strip_markers: bool = False):
    if num_examples < 1:
      raise ValueError(f"num_examples={num_examples!r} must be >= 1")
    text = embedded.stdlib_text_source(split)
    lines: list[list[bytes]] = [[] for _ in LINE_KINDS]
    for i in range(min(len(text), max_files)):
      for line in text[i]["text"].splitlines():
        line = line.strip()[:max_bytes]
        kind = line_kind(line)
        if kind is not None and strip_markers:
          line = strip_marker(line, kind)
        if kind is not None and line:
          lines[kind].append(line)
    if not all(lines):
      raise ValueError(f"LineKindSource: split {split!r} (first {max_files} files) "
                       "lacks a line of some kind")
    self._lines = lines
    self._num_examples = num_examples
    self._seed = seed

  def __len__(self) -> int:
    return self._num_examples

  def __getitem__(self, index: int) -> dict[str, Any]:
    index = int(index)
    if not 0 <= index < self._num_examples:
      raise IndexError(f"index {index} out of range for {self._num_examples} records")
    label = index % len(LINE_KINDS)
    pool = self._lines[label]
    rng = np.random.default_rng([self._seed, index])
    return {"text": pool[int(rng.integers(len(pool)))], "label": np.int64(label)}
