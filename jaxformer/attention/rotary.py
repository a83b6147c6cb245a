"""Rotary position embedding (RoPE, Su et al. 2021), half-split layout."""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def apply_rotary_embedding(x_BLHD: Array, positions_BL: jax.typing.ArrayLike, *,
                           base: float = 10000.0) -> Array:
  """Rotates feature pairs ``(x[..., i], x[..., i + D/2])`` by ``position * base^(-2i/D)``.

  Applied to queries and keys, the dot product ``q_m . k_n`` then depends on ``m - n``
  only. The angle is computed in float32; the result has the dtype of ``x``.

  Args:
    x_BLHD: ``[batch, length, heads, head_dim]``, ``head_dim`` even.
    positions_BL: int or float ``[batch, length]`` (or ``[1, length]``) positions.
    base: the wavelength base.
  Returns:
    ``[batch, length, heads, head_dim]``.
  """
  if x_BLHD.ndim != 4:
    raise ValueError(f"apply_rotary_embedding: x must be [batch, length, heads, head_dim],"
                     f" got shape {x_BLHD.shape}")
  head_dim = x_BLHD.shape[-1]
  if head_dim % 2:
    raise ValueError(f"apply_rotary_embedding: head_dim={head_dim} must be even")
  positions_BL = jnp.asarray(positions_BL)
  if (positions_BL.ndim != 2 or positions_BL.shape[1] != x_BLHD.shape[1]
      or positions_BL.shape[0] not in (1, x_BLHD.shape[0])):
    raise ValueError(f"apply_rotary_embedding: positions shape {positions_BL.shape} must be "
                     f"[batch, length] = [{x_BLHD.shape[0]} or 1, {x_BLHD.shape[1]}]")
  half = head_dim // 2
  inv_freq_F = base ** (-jnp.arange(half, dtype=jnp.float32) * 2.0 / head_dim)
  angle_BLF = positions_BL.astype(jnp.float32)[:, :, None] * inv_freq_F[None, None, :]
  sin_BL1F = jnp.sin(angle_BLF)[:, :, None, :]
  cos_BL1F = jnp.cos(angle_BLF)[:, :, None, :]
  x = x_BLHD.astype(jnp.float32)
  x1, x2 = x[..., :half], x[..., half:]
  out = jnp.concatenate([x1 * cos_BL1F - x2 * sin_BL1F, x2 * cos_BL1F + x1 * sin_BL1F],
                        axis=-1)
  return out.astype(x_BLHD.dtype)
