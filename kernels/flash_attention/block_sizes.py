"""Tile sizes for the flash attention kernels, as explicit data.

A `BlockSizes` is a frozen (hashable) dataclass so that it can be a static
argument of `jax.jit`. Where tiles come from, in order (nothing global and
nothing mutable, so results never depend on call order):
  1. `flash_attention(block_sizes=BlockSizes(...))`: these tiles;
  2. `flash_attention(block_sizes=table)` with a `BlockTable` (autotune.py
     writes one as JSON, `block_table.BlockTable.load` reads it): the entry
     for this backend, dtype, head dims, causal/segments and length buckets;
  3. otherwise `DEFAULTS[backend]`, per head dim (below).

Backend rules (checked by `BlockSizes.validate`):
  * "triton" (GPU): every block a power of two >= 16 (Triton tensors must have
    power-of-two sizes and `tl.dot` wants >= 16 rows).
  * "mosaic" (TPU): block_q/block_*_dq/block_q_dkv multiples of 8 (sublanes),
    key blocks multiples of 128 (lanes). In interpret mode multiples of 8 are
    enough everywhere, so tests can use small tiles.
  * "mosaic_gpu" (Hopper): block_q and block_q_dq are the rows of one CTA's
    two consumer warpgroups, multiples of 128; block_k_dkv likewise (the
    dK/dV kernel's two warpgroups own key rows); the rest multiples of 64
    (wgmma's M per warpgroup, 128-byte swizzled rows), at most 256.
"""

from __future__ import annotations

import dataclasses
import math
import types
from typing import Mapping

BACKENDS = ("triton", "mosaic", "mosaic_gpu")
# mosaic_gpu tiles split over two consumer warpgroups (rows per CTA).
_MGPU_PAIRED = ("block_q", "block_q_dq", "block_k_dkv")


def next_power_of_2(x: int) -> int:
  """Smallest power of two >= max(x, 1)."""
  return 1 << max(int(x) - 1, 0).bit_length()


def round_up(x: int, multiple: int) -> int:
  return -(-int(x) // multiple) * multiple


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tile sizes of the forward, dK/dV and dQ kernels.

  Attributes:
    block_q: query rows per program of the forward kernel.
    block_k: key rows per inner-loop step of the forward kernel.
    block_q_dkv: query rows per inner-loop step of the dK/dV kernel
      (None: min(block_q, 64): 64 rows keep the GPU matmuls on tensor cores).
    block_k_dkv: key rows per program of the dK/dV kernel (None: block_q).
    block_q_dq: query rows per program of the dQ kernel (None: block_q).
    block_k_dq: key rows per inner-loop step of the dQ kernel
      (None: block_q_dkv).
    num_warps: Triton warps per program (None: chosen per kernel from its
      tile and head dim, see gpu.num_warps).
    num_stages: Triton software-pipelining stages (None: 2); on Mosaic GPU
      the forward's K/V ring depth (None: 2; at most 4, as SMEM allows).
  """

  block_q: int = 128
  block_k: int = 64
  block_q_dkv: int | None = None
  block_k_dkv: int | None = None
  block_q_dq: int | None = None
  block_k_dq: int | None = None
  num_warps: int | None = None
  num_stages: int | None = None

  def __post_init__(self):
    for field in dataclasses.fields(self):
      value = getattr(self, field.name)
      if value is None and field.name not in ("block_q", "block_k"):
        continue
      if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(
            f"BlockSizes.{field.name} must be a positive int"
            f"{'' if field.name in ('block_q', 'block_k') else ' or None'},"
            f" got {value!r}.")

  # The backward tiles, with the documented fallbacks resolved.
  @property
  def dkv(self) -> tuple[int, int]:
    """(block_q_dkv, block_k_dkv)."""
    bq = self.block_q_dkv or min(self.block_q, 64)
    return bq, self.block_k_dkv or self.block_q

  @property
  def dq(self) -> tuple[int, int]:
    """(block_q_dq, block_k_dq)."""
    return self.block_q_dq or self.block_q, self.block_k_dq or self.dkv[0]

  def q_blocks(self) -> tuple[int, ...]:
    """Every tile along the query axis (all must divide the padded Lq)."""
    return (self.block_q, self.dkv[0], self.dq[0])

  def k_blocks(self) -> tuple[int, ...]:
    """Every tile along the key axis (all must divide the padded Lk)."""
    return (self.block_k, self.dkv[1], self.dq[1])

  def validate(self, backend: str, *, interpret: bool = False) -> None:
    """Raises ValueError if a tile breaks `backend`'s rules (module docstring)."""
    if backend not in BACKENDS:
      raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}.")
    names = ("block_q", "block_q_dkv", "block_q_dq",
             "block_k", "block_k_dkv", "block_k_dq")
    values = self.q_blocks() + self.k_blocks()
    for i, (name, value) in enumerate(zip(names, values)):
      if backend == "triton":
        ok, rule = value >= 16 and value & (value - 1) == 0, "a power of 2 >= 16"
      elif backend == "mosaic_gpu":
        unit = 128 if name in _MGPU_PAIRED else 64
        ok = value % unit == 0 and value <= 256
        rule = f"a multiple of {unit}, at most 256"
      elif interpret or i < 3:
        ok, rule = value % 8 == 0, "a multiple of 8"
      else:
        ok, rule = value % 128 == 0, "a multiple of 128"
      if not ok:
        raise ValueError(
            f"BlockSizes.{name} (resolved) = {value} must be {rule} for the"
            f" {backend!r} backend{' in interpret mode' if interpret else ''};"
            f" got {self}.")

  def fit(self, q_len: int, kv_len: int, backend: str) -> BlockSizes:
    """Shrinks tiles that exceed the (minimally padded) sequence lengths.

    So a length-1 decode step pads to 16 rows, not to 128. Keeps the backend
    rules: halves powers of two (triton) or rounds up to the minimum multiple.
    """
    if backend not in BACKENDS:
      raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}.")
    def shrink(block: int, length: int, minimum: int) -> int:
      if backend == "mosaic_gpu":
        return min(block, round_up(length, minimum))
      if backend == "triton":
        return max(min(block, next_power_of_2(length)), minimum)
      return min(block, round_up(length, minimum))

    q_min = 16 if backend == "triton" else 8
    k_min = 16 if backend == "triton" else 8
    pair = q_min
    if backend == "mosaic_gpu":
      q_min = k_min = 64
      pair = 128
    dkv_q, dkv_k = self.dkv
    dq_q, dq_k = self.dq
    return dataclasses.replace(
        self,
        block_q=shrink(self.block_q, q_len, max(q_min, pair)),
        block_k=shrink(self.block_k, kv_len, k_min),
        block_q_dkv=shrink(dkv_q, q_len, q_min),
        block_k_dkv=shrink(dkv_k, kv_len, max(k_min, pair)),
        block_q_dq=shrink(dq_q, q_len, max(q_min, pair)),
        block_k_dq=shrink(dq_k, kv_len, k_min),
    )

  @classmethod
  def get_default(cls, backend: str, head_dim: int) -> BlockSizes:
    """The `DEFAULTS` entry of `backend` for head dims up to `head_dim`."""
    if backend not in DEFAULTS:
      raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}.")
    for max_head_dim, blocks in DEFAULTS[backend]:
      if head_dim <= max_head_dim:
        return blocks
    raise ValueError(f"head_dim = {head_dim} exceeds the largest default"
                     f" ({DEFAULTS[backend][-1][0]}) of backend {backend!r}.")


def lcm_block(blocks: tuple[int, ...]) -> int:
  """Least common multiple of the tiles along one axis (the padding unit)."""
  out = 1
  for b in blocks:
    out = out * b // math.gcd(out, b)
  return out


# Defaults per backend: (largest head dim, tiles), the first that fits is used.
# Triton: the forward keeps the FlashAttention-2 tiles (128 x 64, 64 x 64 at
# 64 x 32 at head dim 256 to fit shared memory); the backward tiles have at least 64 rows
# on both axes so that every matmul stays on the tensor cores (16/32-row tiles
# fall off them on Ampere/Hopper). num_warps=None: per kernel, gpu.num_warps.
# mosaic_gpu: FlashAttention-3's sm90 tiles (128 query rows = two consumer
# warpgroups of 64; 64-row key tiles at head dim 256 so that the K/V ring fits
# 227 KiB of shared memory). At head dim 64 the forward streams 256-key tiles,
# as JAX's attention_mgpu.py benchmark picks for the same 2 x 64-row design
# (FA3 streams 192 with three warpgroups): a 64-wide tile's matmuls are short,
# so fewer, longer steps amortise each step's barriers and softmax bookkeeping;
# still one CTA per SM, which the registers already impose.
DEFAULTS: Mapping[str, tuple[tuple[int, BlockSizes], ...]] = (
    types.MappingProxyType({
        "triton": (
            (64, BlockSizes(block_q=128, block_k=64, block_q_dkv=64,
                            block_k_dkv=128, block_q_dq=128, block_k_dq=64,
                            num_stages=3)),
            (128, BlockSizes(block_q=128, block_k=64, block_q_dkv=64,
                             block_k_dkv=64, block_q_dq=64, block_k_dq=64,
                             num_stages=2)),
            (256, BlockSizes(block_q=64, block_k=32, block_q_dkv=64,
                             block_k_dkv=64, block_q_dq=64, block_k_dq=64,
                             num_stages=2)),
        ),
        "mosaic": (
            (256, BlockSizes(block_q=128, block_k=128, block_q_dkv=128,
                             block_k_dkv=128, block_q_dq=128, block_k_dq=128)),
        ),
        "mosaic_gpu": (
            (64, BlockSizes(block_q=128, block_k=256, block_q_dkv=64,
                            block_k_dkv=128, block_q_dq=128, block_k_dq=64)),
            (128, BlockSizes(block_q=128, block_k=128, block_q_dkv=64,
                             block_k_dkv=128, block_q_dq=128, block_k_dq=64)),
            (256, BlockSizes(block_q=128, block_k=64, block_q_dkv=64,
                             block_k_dkv=128, block_q_dq=128, block_k_dq=64)),
        ),
    }))
