"""Sequence packing for language modelling: documents -> fixed ``[batch, length]`` rows.

:class:`PackedLMDataset` is a grain ``IterDataset`` over a grain ``MapDataset`` of
tokenized documents (int32 arrays ``[BOS, t_1, ..., t_n, EOS]``). A document of ``n``
tokens gives ``n + 1`` (input, target) pairs, ``(BOS -> t_1), ..., (t_n -> EOS)``;
these pairs are laid into rows of ``seq_len`` slots:

* ``pack=True``: many documents share a row. Each gets its own segment id (1, 2, ...
  within the row; 0 = padding) and positions counted from 0. No target crosses a
  document: the last target of every document is ``EOS``.
* A document that does not fit in the rest of a row is split there; its remainder
  continues in the next row this stream fills, as a new segment whose positions
  restart at 0 (its first input is the token where the split happened, so every
  target of the document is predicted exactly once).
* ``pack=False``: one document chunk per row, the rest of the row is padding.
* Documents with no tokens are skipped.
* Padding slots: inputs/targets ``pad_id``, segment id 0, position 0, weight 0.

Rows are filled from ``streams`` independent document streams: stream ``s`` reads the
documents ``docs[s::streams]`` and fills the rows ``r`` with ``r % streams == s`` of
every batch, continuing its current document from one batch to the next. With
``streams == batch_size`` every row of a batch comes from a different document (good
for training on long documents); with ``streams == 1`` rows are filled in order,
which wastes no slots in a finite pass (good for evaluation).

The iterator's state is ``{"index": [...], "offset": [...]}``: per stream the index of
its current document in ``docs[s::streams]`` and how many pairs of it were emitted.
It is plain JSON; restoring it re-reads one document per stream.
"""

from __future__ import annotations

from typing import Any

import grain
import numpy as np

LM_FEATURES = ("inputs", "targets", "segment_ids", "positions", "weights")
# Consecutive empty documents after which a stream gives up (endless data of nothing).
EMPTY_LIMIT = 10_000


class PackedLMDataset(grain.IterDataset):
  """Packs tokenized documents into LM batches (see the module docstring)."""

  def __init__(self, docs: grain.MapDataset, *, seq_len: int, batch_size: int,
               pad_id: int, pack: bool = True, streams: int | None = None,
               drop_remainder: bool = False, source_name: str = "the source"):
    """Args:
      docs: int32 arrays ``[BOS, t_1, ..., t_n, EOS]``, one per document.
      seq_len: slots per row ``L``.
      batch_size: rows per batch ``B``.
      pad_id: token id written into padding slots.
      pack: several documents per row (True) or one chunk per row (False).
      streams: number of document streams, in ``[1, batch_size]``; default
        ``batch_size``.
      drop_remainder: drop a final batch that has empty rows (finite data only).
      source_name: names the source in the error for data without tokens.
    """
    super().__init__(docs)
    for name, value in (("seq_len", seq_len), ("batch_size", batch_size)):
      if not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}.")
    streams = batch_size if streams is None else streams
    if not isinstance(streams, int) or not 1 <= streams <= batch_size:
      raise ValueError(f"streams must be an int in [1, batch_size={batch_size}], "
                       f"got {streams!r}.")
    self._docs = docs
    self._seq_len = seq_len
    self._batch_size = batch_size
    self._pad_id = pad_id
    self._pack = pack
    self._streams = streams
    self._drop_remainder = drop_remainder
    self._source_name = source_name

  def __iter__(self) -> PackedLMIterator:
    return PackedLMIterator(
        [self._docs[s::self._streams] for s in range(self._streams)],
        seq_len=self._seq_len, batch_size=self._batch_size, pad_id=self._pad_id,
        pack=self._pack, drop_remainder=self._drop_remainder,
        source_name=self._source_name)

  def __str__(self) -> str:
    return (f"PackedLMDataset(seq_len={self._seq_len}, batch_size="
            f"{self._batch_size}, pack={self._pack}, streams={self._streams})")


class PackedLMIterator(grain.DatasetIterator):
  """Iterator of :class:`PackedLMDataset`; yields dicts of numpy ``[B, L]`` arrays."""

  def __init__(self, streams: list[grain.MapDataset], *, seq_len: int,
               batch_size: int, pad_id: int, pack: bool, drop_remainder: bool,
               source_name: str = "the source"):
    super().__init__()
    self._source_name = source_name
    self._streams = streams
    self._lengths = [len(s) for s in streams]
    self._seq_len = seq_len
    self._batch_size = batch_size
    self._pad_id = pad_id
    self._pack = pack
    self._drop_remainder = drop_remainder
    self._rows_of = [list(range(s, batch_size, len(streams)))
                     for s in range(len(streams))]
    self._arange = np.arange(seq_len, dtype=np.int32)
    self._index = [0] * len(streams)
    self._offset = [0] * len(streams)
    self._doc: list[np.ndarray | None] = [None] * len(streams)

  def _current_doc(self, s: int) -> np.ndarray | None:
    """Stream ``s``'s current non-empty document, or None when it is exhausted."""
    doc = self._doc[s]
    empty = 0
    while doc is None:
      if self._index[s] >= self._lengths[s]:
        return None
      doc = self._streams[s][self._index[s]]
      if len(doc) < 3:  # [BOS, EOS]: an empty document.
        self._index[s] += 1
        doc = None
        empty += 1
        # Repeated data without a single token would be skipped forever.
        if empty > EMPTY_LIMIT:
          raise ValueError(f"{self._source_name} gives no tokens: {empty} documents "
                           "in a row are empty (empty files or texts?)")
      self._doc[s] = doc
    return doc

  def _fill_row(self, s: int, row_slice: dict[str, np.ndarray]) -> bool:
    """Fills one row from stream ``s``; returns whether anything was written."""
    L, col, seg = self._seq_len, 0, 0
    inputs, targets = row_slice["inputs"], row_slice["targets"]
    while col < L:
      doc = self._current_doc(s)
      if doc is None:
        break
      start = self._offset[s]
      take = min(L - col, len(doc) - 1 - start)
      seg += 1
      inputs[col:col + take] = doc[start:start + take]
      targets[col:col + take] = doc[start + 1:start + 1 + take]
      row_slice["segment_ids"][col:col + take] = seg
      row_slice["positions"][col:col + take] = self._arange[:take]
      row_slice["weights"][col:col + take] = 1.0
      col += take
      self._offset[s] = start + take
      if self._offset[s] == len(doc) - 1:
        self._doc[s] = None
        self._index[s] += 1
        self._offset[s] = 0
      if not self._pack:
        break
    return col > 0

  def __next__(self) -> dict[str, np.ndarray]:
    B, L = self._batch_size, self._seq_len
    batch = {
        "inputs": np.full((B, L), self._pad_id, np.int32),
        "targets": np.full((B, L), self._pad_id, np.int32),
        "segment_ids": np.zeros((B, L), np.int32),
        "positions": np.zeros((B, L), np.int32),
        "weights": np.zeros((B, L), np.float32),
    }
    filled = 0
    for s, rows in enumerate(self._rows_of):
      for r in rows:
        if not self._fill_row(s, {k: v[r] for k, v in batch.items()}):
          break
        filled += 1
    if filled == 0 or (self._drop_remainder and filled < B):
      raise StopIteration
    return batch

  def get_state(self) -> dict[str, Any]:
    return {"index": list(self._index), "offset": list(self._offset)}

  def set_state(self, state: dict[str, Any]) -> None:
    index, offset = list(state["index"]), list(state["offset"])
    if len(index) != len(self._streams) or len(offset) != len(self._streams):
      raise ValueError(f"state is for {len(index)} streams, this iterator has "
                       f"{len(self._streams)}.")
    self._index = [int(i) for i in index]
    self._offset = [int(o) for o in offset]
    self._doc = [None] * len(self._streams)

  def __str__(self) -> str:
    return f"PackedLMIterator(streams={len(self._streams)})"
