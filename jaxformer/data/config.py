"""``config.data`` as a typed section: what every task reads, and where.

:class:`DataConfig` holds the fields every task shares (the source and its options, the
tokenizer, splits, batch sizes, the example length, prefetch). A task that reads more
(a label key, source and target lengths, image statistics, sentence pairs) owns those
fields in a subclass, its ``Task.Data``; the source's own options
(``data.source_options``: ``data_dir`` for TFDS, ``path`` for ``text_files``, ...) are
checked against the source (:func:`jaxformer.data.sources.check_options`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from jaxformer import configs
from jaxformer.data import sources
from jaxformer.data import vocab


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataConfig:
  """The ``data`` section.

  Attributes:
    source: a name of :data:`jaxformer.data.sources.SOURCES`.
    source_options: the source's own options (checked against it).
    tokenizer: ``"bytes"``, ``"chars"``, ``"sentencepiece"``, or None (image data).
    vocab_size: SentencePiece pieces (``tokenizer="sentencepiece"``).
    train_split, eval_split: the splits read for training and evaluation.
    batch_size, eval_batch_size: global batch sizes (divided among processes).
    seq_len: tokens per example (text tasks).
    text_key: the records' text feature.
    prefetch: train batches produced ahead in a background thread.
  """

  source: str
  source_options: dict[str, Any] = dataclasses.field(default_factory=dict)
  tokenizer: str | None = None
  vocab_size: int | None = None
  train_split: str = "train"
  eval_split: str = "validation"
  batch_size: int
  eval_batch_size: int
  seq_len: int | None = None
  text_key: str = "text"
  prefetch: int = 0

  def __post_init__(self):
    # A validation split of at least one window of seq_len + 1 tokens (bytes, at
    # most): less is evaluated over the same few bytes repeated, or not at all.
    needs = ({"min_validation_bytes": self.seq_len + 1}
             if self.source == "text_files" and self.seq_len else {})
    object.__setattr__(self, "source_options",
                       sources.check_options(self.source, self.source_options, **needs))
    if self.tokenizer is not None and self.tokenizer not in vocab.TOKENIZERS:
      raise ValueError(f"data.tokenizer={self.tokenizer!r} is not one of "
                       f"{vocab.TOKENIZERS}")
    configs.check_positive(self, "data", "batch_size", "eval_batch_size", "seq_len")
    if self.prefetch < 0:
      raise ValueError(f"data.prefetch={self.prefetch!r} must be an int >= 0")

  def split(self, train: bool) -> str:
    return self.train_split if train else self.eval_split

  def describe(self) -> str:
    """What a run reads, for its header line: source, set options and both splits.

    E.g. ``data 'imdb_reviews' (train split 'train', eval split 'test')``.
    """
    shown = {k: v for k, v in self.source_options.items() if v is not None}
    return (f"data {self.source!r}" + (f" {shown}" if shown else "")
            + f" (train split {self.train_split!r}, eval split {self.eval_split!r})")

  def read_source(self, train: bool) -> Any:
    """The train or eval split of the source (random access)."""
    return sources.get_source(self.source, self.split(train), **self.source_options)

  @classmethod
  def parse(cls, section: Any, path: str = "data") -> DataConfig:
    """``section`` as this class (errors name ``data.<field>``)."""
    return configs.parse(cls, section, path)

  @classmethod
  def parse_shared(cls, section: Any) -> DataConfig:
    """The fields of ``section`` this class has (a task's data section read by code
    that needs only the shared fields, e.g. the tokenizer)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return configs.parse(cls, {k: v for k, v in configs.plain(section).items()
                               if k in names}, "data")
