"""One token stream read as nanoGPT reads it: random contiguous windows.

A single text (one file's train or validation split) is tokenized once into one
stream, with no separators. Each example is a window of ``seq_len + 1`` consecutive
tokens at a random offset: ``inputs`` are its first ``seq_len`` tokens, ``targets``
the last ``seq_len``. No packing, no padding, no document ids: every position counts.

Batch ``b`` of a run is drawn from ``numpy.random.default_rng([seed, b])`` (the
global batch's offsets; a process takes its own rows), so the source stays random
access: the data state is the index of the next batch (grain's iterator state), a
resumed run draws exactly the batches it would have drawn, and the evaluation
windows (seed 0 over the validation split) are the same on every run and resume.
"""

from __future__ import annotations

from typing import Any

import grain
import numpy as np

# Batches a stream can hand out: enough for any run (they are drawn, not stored).
NUM_BATCHES = 1 << 40


class TokenWindows:
  """Random-access batches of random windows of one token stream.

  ``windows[b]`` is ``{"inputs": int32 [B, L], "targets": int32 [B, L]}`` with
  ``targets[:, i] == inputs[:, i + 1]`` for ``i < L - 1``.

  Args:
    tokens: the stream, 1-D integers (at least ``seq_len + 1`` of them).
    seq_len: ``L``.
    batch_size: ``B``, rows per batch of this process.
    seed: draws the offsets.
    shard_index / shard_count: this process's rows of the global batch
      (``shard_count * B`` rows are drawn per batch).
    name: for messages.
  """

  def __init__(self, tokens: np.ndarray, *, seq_len: int, batch_size: int, seed: int,
               shard_index: int = 0, shard_count: int = 1, name: str = "tokens"):
    tokens = np.asarray(tokens)
    if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
      raise ValueError(f"{name}: tokens must be a 1-D integer array, got "
                       f"{tokens.dtype} {tokens.shape}")
    for field, value, low in (("seq_len", seq_len, 1), ("batch_size", batch_size, 1),
                              ("seed", seed, 0), ("shard_count", shard_count, 1)):
      if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or (
          value < low):
        raise ValueError(f"{field} must be an int >= {low}, got {value!r}")
    if not 0 <= shard_index < shard_count:
      raise ValueError(f"shard_index must be in [0, {shard_count}), got {shard_index!r}")
    if len(tokens) < seq_len + 1:
      raise ValueError(f"{name} has {len(tokens)} tokens, fewer than data.seq_len + 1 "
                       f"= {seq_len + 1}: use more text or a shorter data.seq_len")
    self._tokens = tokens.astype(np.int32, copy=False)
    self._seq_len = seq_len
    self._batch = batch_size
    self._seed = seed
    self._rows = slice(shard_index * batch_size, (shard_index + 1) * batch_size)
    self._global = batch_size * shard_count
    self._name = name
    self._offsets = np.arange(seq_len + 1)

  def __len__(self) -> int:
    return NUM_BATCHES

  def starts(self, index: int) -> np.ndarray:
    """The offsets of batch ``index``'s windows (this process's rows)."""
    last = len(self._tokens) - self._seq_len - 1   # the last valid start
    rng = np.random.default_rng([self._seed, int(index)])
    return rng.integers(0, last + 1, size=self._global)[self._rows]

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    index = int(index)
    if not 0 <= index < NUM_BATCHES:
      raise IndexError(f"batch {index} out of range")
    w = self._tokens[self.starts(index)[:, None] + self._offsets]
    return {"inputs": np.ascontiguousarray(w[:, :-1]),
            "targets": np.ascontiguousarray(w[:, 1:])}

  def __repr__(self) -> str:
    return (f"TokenWindows({self._name!r}, tokens={len(self._tokens)}, "
            f"seq_len={self._seq_len}, batch={self._batch})")


def window_pipeline(tokens: np.ndarray, *, seq_len: int, batch_size: int, seed: int,
                    shard_index: int = 0, shard_count: int = 1, prefetch: int = 0,
                    name: str = "tokens") -> grain.DatasetIterator:
  """Endless batches of :class:`TokenWindows` as a grain iterator (``get_state()`` /
  ``set_state()``: the next batch's index); ``prefetch > 0`` makes that many batches
  ahead in a background thread (the state still describes the batches handed out)."""
  if isinstance(prefetch, bool) or not isinstance(prefetch, int) or prefetch < 0:
    raise ValueError(f"prefetch must be an int >= 0, got {prefetch!r}")
  windows = TokenWindows(tokens, seq_len=seq_len, batch_size=batch_size, seed=seed,
                         shard_index=shard_index, shard_count=shard_count, name=name)
  ds: Any = grain.MapDataset.source(windows).to_iter_dataset(
      grain.ReadOptions(num_threads=0))
  if prefetch:
    ds = grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=prefetch)
  return iter(ds)
