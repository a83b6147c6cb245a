"""Special tokens, defined once for every tokenizer.

Each tokenizer places the seven special tokens somewhere in its vocabulary and exposes
their ids as attributes (``tok.pad_id``, ``tok.bos_id``, ...) through a
:class:`SpecialIds` record. The strings below are what ``decode(...,
skip_special=False)`` prints for them.
"""

from __future__ import annotations

import dataclasses

PAD = "[PAD]"
BOS = "[BOS]"
EOS = "[EOS]"
UNK = "[UNK]"
CLS = "[CLS]"
SEP = "[SEP]"
MASK = "[MASK]"

# The canonical order: a tokenizer that appends its specials to a base vocabulary (the
# byte tokenizer) or prepends them (the char tokenizer) uses this order.
SPECIAL_TOKENS: tuple[str, ...] = (PAD, BOS, EOS, UNK, CLS, SEP, MASK)


@dataclasses.dataclass(frozen=True)
class SpecialIds:
  """The ids of the special tokens in one vocabulary."""

  pad: int
  bos: int
  eos: int
  unk: int
  cls: int
  sep: int
  mask: int

  @classmethod
  def consecutive(cls, start: int) -> SpecialIds:
    """Ids ``start, start + 1, ...`` in the order of :data:`SPECIAL_TOKENS`."""
    return cls(*range(start, start + len(SPECIAL_TOKENS)))

  def as_dict(self) -> dict[str, int]:
    """Maps each special token string (``"[PAD]"``, ...) to its id."""
    return dict(zip(SPECIAL_TOKENS, dataclasses.astuple(self)))

  @property
  def all(self) -> tuple[int, ...]:
    """All special ids, in the order of :data:`SPECIAL_TOKENS`."""
    return dataclasses.astuple(self)
