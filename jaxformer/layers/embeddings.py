"""Embeddings: token (with a tied output projection), positions, patches, token types.

Every table carries logical axis names from :mod:`jaxformer.axes`. Positions are always
computed from a ``positions`` array ``[batch, length]`` (not from ``arange``) so packed
sequences (positions reset per document) and incremental decoding (one position per step)
use the same code.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxformer import axes

Array = jax.Array
Dtype = Any
Initializer = Any

# Rotary embeddings live with the attention core (they act on q and k inside
# MultiHeadAttention; ``positions="rotary"`` in a model config sets its ``rotary_base``).
# Re-exported here so every kind of position encoding is found in one module.
from jaxformer.attention import apply_rotary_embedding  # noqa: E402,F401

POSITION_KINDS = ("learned", "sinusoidal", "rotary", "none")


def check_position_kind(positions: str, *, field: str = "positions") -> None:
  """Raises ValueError unless ``positions`` is one of :data:`POSITION_KINDS`."""
  if positions not in POSITION_KINDS:
    raise ValueError(f"{field}={positions!r}; expected one of {POSITION_KINDS}")


def default_positions(inputs_BL: Array) -> Array:
  """int32 positions ``[batch, length]`` = 0..length-1 for a ``[batch, length, ...]`` input."""
  batch, length = inputs_BL.shape[:2]
  return jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32)[None, :], (batch, length))


class Embed(nn.Module):
  """Token embedding table ``[num_embeddings, features]`` (axes ``vocab, embed``).

  ``__call__(ids [B, L]) -> [B, L, features]`` in ``dtype``;
  ``attend(x [B, L, features]) -> [B, L, num_embeddings]`` float32 logits against the same
  table (a tied output layer, as in GPT-2 / BERT / the original Transformer).

  Attributes:
    num_embeddings: vocabulary size.
    features: embedding width.
    scale_by_sqrt_dim: multiply looked-up vectors by ``sqrt(features)`` (original
      Transformer, which initialises with stddev ``features**-0.5``).
    embedding_init: initializer of the table.
  """
  num_embeddings: int
  features: int
  scale_by_sqrt_dim: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  embedding_init: Initializer = nn.initializers.normal(stddev=0.02)

  def setup(self):
    self.embedding = self.param(
        "embedding",
        nn.with_logical_partitioning(self.embedding_init, (axes.VOCAB, axes.EMBED)),
        (self.num_embeddings, self.features), self.param_dtype)

  def __call__(self, ids_BL: Array) -> Array:
    """ids: int [batch, length] -> [batch, length, features]."""
    if not jnp.issubdtype(ids_BL.dtype, jnp.integer):
      raise TypeError(f"Embed expects integer ids, got dtype {ids_BL.dtype}")
    x_BLD = jnp.take(jnp.asarray(self.embedding, self.dtype), ids_BL, axis=0)
    if self.scale_by_sqrt_dim:
      x_BLD = x_BLD * jnp.asarray(np.sqrt(self.features), self.dtype)
    return x_BLD

  def attend(self, x_BLD: Array) -> Array:
    """x: [batch, length, features] -> float32 logits [batch, length, num_embeddings]."""
    table_VD = jnp.asarray(self.embedding, self.dtype)
    return jnp.einsum("...d,vd->...v", x_BLD.astype(self.dtype), table_VD,
                      preferred_element_type=jnp.float32).astype(jnp.float32)


class TokenTypeEmbed(nn.Module):
  """Segment A/B (token type) embedding of BERT: ``ids [B, L] -> [B, L, features]``."""
  type_vocab_size: int
  features: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  embedding_init: Initializer = nn.initializers.normal(stddev=0.02)

  @nn.compact
  def __call__(self, token_type_ids_BL: Array) -> Array:
    table = self.param(
        "embedding",
        nn.with_logical_partitioning(self.embedding_init, (None, axes.EMBED)),
        (self.type_vocab_size, self.features), self.param_dtype)
    return jnp.take(jnp.asarray(table, self.dtype), token_type_ids_BL, axis=0)


class LearnedPositionEmbed(nn.Module):
  """Learned absolute positions: a ``[max_length, features]`` table (``position, embed``).

  ``__call__(positions [B, L]) -> [B, L, features]``. Positions must be < max_length
  (out-of-range gathers are clamped by XLA, so validate lengths at the model level).
  """
  max_length: int
  features: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  embedding_init: Initializer = nn.initializers.normal(stddev=0.02)

  @nn.compact
  def __call__(self, positions_BL: Array) -> Array:
    table = self.param(
        "embedding",
        nn.with_logical_partitioning(self.embedding_init, (axes.POSITION, axes.EMBED)),
        (self.max_length, self.features), self.param_dtype)
    return jnp.take(jnp.asarray(table, self.dtype), positions_BL, axis=0)


def sinusoidal_embedding(positions_BL: Array, features: int, *,
                         max_timescale: float = 10_000.0,
                         dtype: Dtype = jnp.float32) -> Array:
  """Fixed sinusoidal positions of "Attention Is All You Need", interleaved.

  ``E[p, 2i] = sin(p / max_timescale**(2i/d))``, ``E[p, 2i+1] = cos(...)``.

  Args:
    positions_BL: int or float positions ``[batch, length]`` (any leading shape works).
    features: ``d``, must be even.
    max_timescale: the 10000 of the paper.
    dtype: output dtype (the angles are computed in float32).
  Returns:
    ``[*positions.shape, features]``.
  """
  if features % 2:
    raise ValueError(f"sinusoidal_embedding: features={features} must be even")
  two_i = np.arange(0, features, 2, dtype=np.float64)
  inv_freq = jnp.asarray(1.0 / (max_timescale ** (two_i / features)), jnp.float32)
  inv_freq = inv_freq.reshape((1,) * positions_BL.ndim + (features // 2,))
  angles = positions_BL.astype(jnp.float32)[..., None] * inv_freq  # [..., d/2]
  emb = jnp.stack([jnp.sin(angles), jnp.cos(angles)], axis=-1)      # [..., d/2, 2]
  return emb.reshape(*positions_BL.shape, features).astype(dtype)


class PatchEmbed(nn.Module):
  """Image -> non-overlapping patches -> linear projection (the ViT stem).

  Equivalent to a convolution with kernel = stride = ``patch_size`` ("VALID"); written as
  reshape + matmul so the kernel is ``[patch*patch*channels, features]`` with axes
  ``(patch, embed)``. Pixels of a patch are flattened in ``(row, col, channel)`` order, so
  a conv kernel ``[P, P, C, D]`` (HWIO) loads with ``kernel.reshape(P*P*C, D)``.

  ``__call__(images [B, H, W, C]) -> [B, (H/P)*(W/P), features]``, patches in raster order.
  """
  patch_size: int
  features: int
  use_bias: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  kernel_init: Initializer = nn.initializers.lecun_normal()

  @nn.compact
  def __call__(self, images_BHWC: Array) -> Array:
    if images_BHWC.ndim != 4:
      raise ValueError(f"PatchEmbed expects images [batch, height, width, channels], "
                       f"got shape {images_BHWC.shape}")
    b, h, w, c = images_BHWC.shape
    p = self.patch_size
    if h % p or w % p:
      raise ValueError(f"image size {(h, w)} is not divisible by patch_size={p}")
    x = images_BHWC.reshape(b, h // p, p, w // p, p, c)
    x = x.transpose(0, 1, 3, 2, 4, 5).reshape(b, (h // p) * (w // p), p * p * c)
    kernel = self.param(
        "kernel", nn.with_logical_partitioning(self.kernel_init, (axes.PATCH, axes.EMBED)),
        (p * p * c, self.features), self.param_dtype)
    y = jnp.einsum("bnk,kd->bnd", x.astype(self.dtype), jnp.asarray(kernel, self.dtype))
    if self.use_bias:
      bias = self.param(
          "bias", nn.with_logical_partitioning(nn.initializers.zeros, (axes.EMBED,)),
          (self.features,), self.param_dtype)
      y = y + jnp.asarray(bias, self.dtype)[None, None, :]
    return y


def positions_from_segment_ids(segment_ids_BL: Array) -> Array:
  """Positions that restart at 0 wherever the segment id changes (packed sequences).

  ``segment_ids [[1, 1, 1, 2, 2, 0]] -> [[0, 1, 2, 0, 1, 0]]``.
  """
  length = segment_ids_BL.shape[-1]
  idx_BL = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), segment_ids_BL.shape)
  prev_BL = jnp.concatenate(
      [jnp.full_like(segment_ids_BL[..., :1], -1), segment_ids_BL[..., :-1]], axis=-1)
  is_start_BL = segment_ids_BL != prev_BL
  start_BL = jax.lax.cummax(jnp.where(is_start_BL, idx_BL, 0), axis=segment_ids_BL.ndim - 1)
  return idx_BL - start_BL
