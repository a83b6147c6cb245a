"""Synthetic data sets for tiny offline experiments (deterministic, no files).

* :func:`reversal_source`: seq2seq sequence reversal, ``{"source": str, "target":
  str}`` with ``target == source[::-1]``; strings over a small alphabet.
* :func:`shapes_source`: ``{"image": uint8 [size, size, 1], "label": int64}``, a small
  image-classification set: one of :data:`SHAPES` drawn bright at a random place on a
  noisy dark background (no image data set ships with the installed packages, and
  MNIST/CIFAR need a TFDS download).

Record ``i`` of split ``s`` depends only on ``(seed, s, i)`` (NumPy's
``default_rng([seed, split_id, i])``), so sources are random access, identical on every
machine and across NumPy versions that keep the PCG64 stream, and splits differ.
"""

from __future__ import annotations

from typing import Any

import numpy as np

SPLIT_IDS = {"train": 0, "validation": 1, "test": 2}
DEFAULT_SIZES = {"train": 10_000, "validation": 500, "test": 500}
SHAPES = ("horizontal", "vertical", "diagonal", "antidiagonal", "square", "plus")


def _split_id(split: str) -> int:
  if split not in SPLIT_IDS:
    raise ValueError(f"split must be one of {sorted(SPLIT_IDS)}, got {split!r}.")
  return SPLIT_IDS[split]


class _Synthetic:
  """Random access over a per-record seeded generator."""

  def __init__(self, split: str, num_examples: int | None, seed: int):
    self._split_id = _split_id(split)
    num_examples = DEFAULT_SIZES[split] if num_examples is None else num_examples
    if not isinstance(num_examples, int) or num_examples < 1:
      raise ValueError(f"num_examples must be a positive int, got {num_examples!r}.")
    self.num_examples = num_examples
    self.seed = seed
    self._cache: dict[int, dict[str, Any]] = {}  # records are small; make each once

  def __len__(self) -> int:
    return self.num_examples

  def __getitem__(self, index: int) -> dict[str, Any]:
    index = int(index)
    if not 0 <= index < self.num_examples:
      raise IndexError(f"index {index} out of range for {self.num_examples} records.")
    record = self._cache.get(index)
    if record is None:
      record = self._make(np.random.default_rng([self.seed, self._split_id, index]))
      self._cache[index] = record
    return dict(record)

  def _make(self, rng: np.random.Generator) -> dict[str, Any]:
    raise NotImplementedError


class ReversalSource(_Synthetic):
  """Sequence reversal: ``target = source[::-1]``."""

  def __init__(self, split: str = "train", *, num_examples: int | None = None,
               min_length: int = 4, max_length: int = 12,
               alphabet: str = "abcdefghij", seed: int = 0):
    super().__init__(split, num_examples, seed)
    if not 1 <= min_length <= max_length:
      raise ValueError(f"need 1 <= min_length <= max_length, got {min_length}, "
                       f"{max_length}.")
    if len(set(alphabet)) < 2:
      raise ValueError(f"alphabet needs >= 2 distinct characters, got {alphabet!r}.")
    self.min_length, self.max_length, self.alphabet = min_length, max_length, alphabet

  def _make(self, rng):
    n = int(rng.integers(self.min_length, self.max_length + 1))
    text = "".join(rng.choice(list(self.alphabet), size=n))
    return {"source": text, "target": text[::-1]}


class ShapesSource(_Synthetic):
  """Noisy images of simple shapes; ``label`` indexes :data:`SHAPES`."""

  def __init__(self, split: str = "train", *, num_examples: int | None = None,
               image_size: int = 8, noise: float = 20.0, seed: int = 0):
    super().__init__(split, num_examples, seed)
    if image_size < 5:
      raise ValueError(f"image_size must be >= 5, got {image_size}.")
    self.image_size, self.noise = image_size, noise

  def _make(self, rng):
    size = self.image_size
    label = int(rng.integers(len(SHAPES)))
    extent = int(rng.integers(3, size // 2 + 2))  # side of the shape's box
    top, left = rng.integers(0, size - extent + 1, size=2)
    box = np.zeros((extent, extent), np.float64)
    mid = extent // 2
    name = SHAPES[label]
    if name == "horizontal":
      box[mid, :] = 1
    elif name == "vertical":
      box[:, mid] = 1
    elif name == "diagonal":
      np.fill_diagonal(box, 1)
    elif name == "antidiagonal":
      np.fill_diagonal(box[:, ::-1], 1)
    elif name == "square":
      box[:, :] = 1
    else:  # plus
      box[mid, :] = 1
      box[:, mid] = 1
    image = np.zeros((size, size), np.float64)
    image[top:top + extent, left:left + extent] = box * 200 + 30
    image += rng.normal(scale=self.noise, size=image.shape)
    image = np.clip(np.round(image), 0, 255).astype(np.uint8)
    return {"image": image[..., None], "label": np.int64(label)}


def reversal_source(split: str = "train", **options) -> ReversalSource:
  """See :class:`ReversalSource`."""
  return ReversalSource(split, **options)


def shapes_source(split: str = "train", **options) -> ShapesSource:
  """See :class:`ShapesSource`."""
  return ShapesSource(split, **options)
