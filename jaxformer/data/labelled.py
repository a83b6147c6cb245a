"""Small labelled text sets for evaluation (prompting, probes): files and a built-in one.

A file is JSONL (one ``{"text": ..., "label": ...}`` object per line) or TSV
(``text<TAB>label`` per line; the label is the last field). :data:`SENTIMENT` is a
tiny built-in sentiment set (``negative`` / ``positive``, balanced) for a default run.
"""

from __future__ import annotations

import io
import json
import os

from jaxformer.data import local_text

SENTIMENT: tuple[tuple[str, str], ...] = (
    ("A wonderful film, moving and beautifully acted.", "positive"),
    ("I loved every minute of it.", "positive"),
    ("The best movie I have seen this year.", "positive"),
    ("Funny, warm and clever: a delight.", "positive"),
    ("A great story with a brilliant cast.", "positive"),
    ("I would happily watch it again.", "positive"),
    ("A boring, badly written mess.", "negative"),
    ("I hated it and left early.", "negative"),
    ("The worst movie I have seen this year.", "negative"),
    ("Dull, slow and far too long.", "negative"),
    ("A terrible plot and awful acting.", "negative"),
    ("I want those two hours of my life back.", "negative"),
)


def read_labelled(path: str | os.PathLike[str]) -> tuple[list[str], list[str]]:
  """``(texts, labels)`` of a JSONL (``.jsonl``/``.json``) or TSV file; labels as str.

  Raises:
    ValueError: a line that is not a text with a label (its number is named), or an
      empty file.
  """
  path = os.fspath(path)
  jsonl = path.endswith((".jsonl", ".json"))
  texts, labels = [], []
  content = local_text.read_text(
      path, how="save it as UTF-8 (e.g. iconv -f latin1 -t utf-8)")
  for number, line in enumerate(io.StringIO(content, newline=None), 1):
    line = line.rstrip("\n")
    if not line.strip():
      continue
    if jsonl:
      try:
        record = json.loads(line)
        text, label = record["text"], record["label"]
      except (json.JSONDecodeError, KeyError, TypeError):
        raise ValueError(f"{path}:{number} is not a JSON object with 'text' and "
                         f"'label': {line[:80]!r}") from None
    else:
      text, tab, label = line.rpartition("\t")
      if not tab:
        raise ValueError(f"{path}:{number} is not 'text<TAB>label': {line[:80]!r}")
    texts.append(str(text))
    labels.append(str(label).strip())
  if not texts:
    raise ValueError(f"{path} has no labelled lines")
  return texts, labels
