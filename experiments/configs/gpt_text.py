"""A GPT on your own text: a file, a folder or a glob, with the tokenizer you pick.

Run (rerunning with the same workdir resumes)::

  python -m experiments.train --config=experiments/configs/gpt_text.py \\
      --config.data.source_options.path=PATH --workdir=runs/my_text \\
      [--config.data.tokenizer=bytes|chars|sentencepiece] \\
      [--config.data.vocab_size=2000]          # SentencePiece pieces

``data.source_options.path`` is a text file, a folder (every file under it) or a glob
(``'~/books/*.txt'``). ``data.source_options.validation_fraction`` of the text is held
out: the last files (sorted by path) when there are several, the tail of the file when
there is one. A single file is read as nanoGPT reads it: each split is one token
stream, and each example a random contiguous window of ``seq_len + 1`` tokens (no
separators, no packing); evaluation uses the same fixed random windows of the
validation split on every run. Several files keep their document boundaries (packed
documents).

``data.tokenizer``: ``bytes`` (256 bytes + 7 specials), ``chars`` (the characters of the
train split) or ``sentencepiece`` (``data.vocab_size`` pieces trained on the train
split). A chars or SentencePiece vocabulary is fitted at the start, saved in
``<workdir>/tokenizer/`` and reused on resume; ``model.vocab_size`` follows it.
The text must be UTF-8 for ``chars`` and ``sentencepiece`` (checked before step 1; a
file that is not names its byte offset): ``data.source_options.encoding='latin-1'``
(any Python codec) reads files in another encoding, ``bytes`` takes any file as is.

Model, optimizer and schedule are ``gpt_bytes.py``'s (4 x 128, context 64, 2,000
steps); ``:tiny`` is its smoke-test size.
"""

from __future__ import annotations

from ml_collections import config_dict

from experiments.configs import common
from experiments.configs import gpt_bytes


def get_config(arg: str | None = None) -> config_dict.ConfigDict:
  """The config; ``arg="tiny"`` (alias ``"runlocal"``) shrinks it for a smoke test."""
  common.variant(arg, "gpt_text")
  c = gpt_bytes.get_config(arg)
  c.model.vocab_size = config_dict.placeholder(int)  # None: the tokenizer's
  c.data.source = "text_files"
  c.data.vocab_size = 512                  # SentencePiece pieces (specials included)
  c.data.source_options = config_dict.ConfigDict(dict(
      path=config_dict.placeholder(str),   # a file, a folder or a glob
      validation_fraction=0.05,
      window_bytes=c.data.seq_len * 4,     # one file: bytes per random window
      encoding=config_dict.placeholder(str),  # the files' encoding if not UTF-8
      seed=c.train.get_ref("seed"),
  ))
  c.task_options.sample_prompt = ""
  return c
