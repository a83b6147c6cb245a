"""A table of tuned tiles, read from and written to JSON (autotune.py fills it).

    table = BlockTable.load("tuned_h100.json")
    out = flash_attention(q, k, v, is_causal=True, block_sizes=table)

A `BlockTable` is immutable and hashable (a static argument of `jax.jit`), and
is passed explicitly: no module keeps tuned tiles, so the tiles a call gets
depend only on its arguments. An entry is keyed by backend, dtype, head dims,
causal, segments and the power-of-two buckets of the two lengths; a call with
no entry gets `BlockSizes.get_default(backend, head_dim)`.

File format (JSON): {"format": 1, "device_kind": str | null,
"entries": [{"key": {TableKey fields}, "block_sizes": {BlockSizes fields}}]}.
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np

from kernels.flash_attention.block_sizes import BACKENDS
from kernels.flash_attention.block_sizes import BlockSizes
from kernels.flash_attention.block_sizes import next_power_of_2

FORMAT = 1


@dataclasses.dataclass(frozen=True)
class TableKey:
  """What a tuned entry applies to.

  Attributes:
    backend: "triton", "mosaic" or "mosaic_gpu".
    dtype: the inputs' dtype name ("bfloat16", "float16", "float32").
    head_dim, head_dim_v: query/key and value head dims (unpadded).
    causal, segments: the mask kind.
    q_bucket, kv_bucket: next power of two of the query / key lengths.
  """

  backend: str
  dtype: str
  head_dim: int
  head_dim_v: int
  causal: bool
  segments: bool
  q_bucket: int
  kv_bucket: int

  @classmethod
  def of(cls, backend: str, q_shape, k_shape, v_shape, dtype, *,
         causal: bool, segments: bool) -> TableKey:
    """The key of a call with these [B, L, H, D] shapes."""
    return cls(backend=backend, dtype=np.dtype(dtype).name,
               head_dim=int(q_shape[-1]), head_dim_v=int(v_shape[-1]),
               causal=bool(causal), segments=bool(segments),
               q_bucket=next_power_of_2(q_shape[1]),
               kv_bucket=next_power_of_2(k_shape[1]))


@dataclasses.dataclass(frozen=True)
class BlockTable:
  """Tuned tiles per `TableKey` for one device kind (None: any)."""

  entries: tuple[tuple[TableKey, BlockSizes], ...] = ()
  device_kind: str | None = None

  def __post_init__(self):
    keys = [key for key, _ in self.entries]
    if len(set(keys)) != len(keys):
      raise ValueError("BlockTable.entries has duplicate keys.")
    for key, blocks in self.entries:
      if key.backend not in BACKENDS:
        raise ValueError(f"BlockTable entry backend must be one of {BACKENDS},"
                         f" got {key.backend!r}.")
      if not isinstance(blocks, BlockSizes):
        raise TypeError(f"BlockTable entry for {key} must be a BlockSizes, got"
                        f" {type(blocks).__name__}.")

  def lookup(self, key: TableKey) -> BlockSizes | None:
    """The tuned tiles for `key`, or None."""
    for entry_key, blocks in self.entries:
      if entry_key == key:
        return blocks
    return None

  def with_entry(self, key: TableKey, blocks: BlockSizes) -> BlockTable:
    """A new table with `key` set to `blocks` (replacing any old entry)."""
    kept = tuple((k, b) for k, b in self.entries if k != key)
    return dataclasses.replace(self, entries=kept + ((key, blocks),))

  def to_json(self) -> dict:
    return {"format": FORMAT, "device_kind": self.device_kind,
            "entries": [{"key": dataclasses.asdict(k),
                         "block_sizes": dataclasses.asdict(b)}
                        for k, b in self.entries]}

  @classmethod
  def from_json(cls, data: dict) -> BlockTable:
    if not isinstance(data, dict) or data.get("format") != FORMAT:
      raise ValueError(f"not a BlockTable (format {FORMAT}) JSON object:"
                       f" {str(data)[:200]}")
    try:
      entries = tuple((TableKey(**e["key"]), BlockSizes(**e["block_sizes"]))
                      for e in data["entries"])
    except (KeyError, TypeError) as e:
      raise ValueError(f"malformed BlockTable entry: {e}") from e
    return cls(entries=entries, device_kind=data.get("device_kind"))

  @classmethod
  def load(cls, path: str | os.PathLike) -> BlockTable:
    """Reads a table written by `save`."""
    with open(path, encoding="utf-8") as f:
      return cls.from_json(json.load(f))

  def save(self, path: str | os.PathLike) -> None:
    """Writes the table as JSON (sorted entries: stable diffs)."""
    data = self.to_json()
    data["entries"].sort(key=lambda e: json.dumps(e["key"], sort_keys=True))
    with open(path, "w", encoding="utf-8") as f:
      json.dump(data, f, indent=1, sort_keys=True)
      f.write("\n")
