"""Small helpers shared by the models: input checks, decode-time positions, configs."""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxformer import axes
from jaxformer.layers import embeddings
from jaxformer.layers.blocks import check_attention_options
from jaxformer.layers.norms import check_norm

Array = jax.Array

ATTENTION_IMPLS = (None, "xla", "chunked", "pallas", "cudnn")


def check_common(cfg: Any) -> None:
  """Validates the fields every model config shares; raises ValueError naming the field.

  Also normalises ``dtype`` / ``param_dtype`` given as strings (``"bfloat16"``, e.g. from
  an ``ml_collections`` command-line override) to NumPy dtypes.
  """
  name = type(cfg).__name__
  for field in ("dtype", "param_dtype"):
    try:
      object.__setattr__(cfg, field, jnp.dtype(getattr(cfg, field)))
    except TypeError as e:
      raise TypeError(f"{name}.{field}={getattr(cfg, field)!r} is not a dtype") from e
  embeddings.check_position_kind(cfg.positions, field=f"{name}.positions")
  check_norm(cfg.norm, cfg.norm_type)
  if cfg.attention_impl not in ATTENTION_IMPLS:
    raise ValueError(f"{name}.attention_impl={cfg.attention_impl!r}; expected one of "
                     f"{ATTENTION_IMPLS}")
  check_attention_options(cfg, name)
  for field in ("num_heads", "embed_dim", "mlp_dim"):
    value = getattr(cfg, field, 1)
    if not isinstance(value, int) or value <= 0:
      raise ValueError(f"{name}.{field}={value!r}; expected a positive int")
  if cfg.embed_dim % cfg.num_heads and getattr(cfg, "head_dim", None) is None:
    raise ValueError(f"{name}.embed_dim={cfg.embed_dim} is not divisible by "
                     f"num_heads={cfg.num_heads}; set head_dim or change one of them")
  head_dim = getattr(cfg, "head_dim", None) or cfg.embed_dim // cfg.num_heads
  if cfg.positions == "rotary" and head_dim % 2:
    raise ValueError(f"{name}.positions='rotary' needs an even head_dim")
  if cfg.positions == "sinusoidal" and cfg.embed_dim % 2:
    raise ValueError(f"{name}.positions='sinusoidal' needs an even embed_dim, "
                     f"got {cfg.embed_dim}")


def replace(cfg: Any, **overrides: Any) -> Any:
  """``dataclasses.replace`` that names the config class when a field is unknown."""
  fields = {f.name for f in dataclasses.fields(cfg)}
  unknown = sorted(set(overrides) - fields)
  if unknown:
    raise TypeError(f"{type(cfg).__name__} has no field(s) {unknown}; "
                    f"fields: {sorted(fields)}")
  return dataclasses.replace(cfg, **overrides)


def check_tokens(name: str, tokens: Any, *, max_length: int | None = None,
                 ndim: int = 2) -> None:
  """Raises TypeError/ValueError unless ``tokens`` is an int array of rank ``ndim``."""
  if not jnp.issubdtype(jnp.asarray(tokens).dtype, jnp.integer):
    raise TypeError(f"{name} must be integer token ids, got dtype {tokens.dtype}")
  if tokens.ndim != ndim:
    raise ValueError(f"{name} must have rank {ndim}, got shape {tokens.shape}")
  if max_length is not None and tokens.shape[-1] > max_length:
    raise ValueError(f"{name} length {tokens.shape[-1]} exceeds max_len={max_length}")


class DecodePositions(nn.Module):
  """Positions for incremental decoding, kept in the 'cache' collection.

  ``__call__(inputs [B, L]) -> int32 [B, L]``: at ``init`` (cache not yet created)
  ``arange(L)``; on later calls ``index + arange(L)``, advancing the stored
  ``position_index`` by ``L``.
  """

  @nn.compact
  def __call__(self, inputs_BL: Array) -> Array:
    is_initialized = self.has_variable("cache", "position_index")
    index = self.variable("cache", "position_index", lambda: jnp.zeros((), jnp.int32))
    positions_BL = embeddings.default_positions(inputs_BL)
    if is_initialized:
      positions_BL = positions_BL + index.value
      index.value = index.value + inputs_BL.shape[1]
    return positions_BL


def add_positions(x_BLD: Array, positions_BL: Array, cfg: Any, max_len: int,
                  *, name: str = "position_embedding") -> Array:
  """Adds learned or sinusoidal positions per ``cfg.positions`` (rotary/none: unchanged).

  Must be called from a compact method (creates the learned table as a submodule).
  """
  if cfg.positions == "learned":
    pos_BLD = embeddings.LearnedPositionEmbed(
        max_len, x_BLD.shape[-1], dtype=cfg.dtype, param_dtype=cfg.param_dtype,
        name=name)(positions_BL)
  elif cfg.positions == "sinusoidal":
    pos_BLD = embeddings.sinusoidal_embedding(positions_BL, x_BLD.shape[-1],
                                              dtype=cfg.dtype)
  else:
    return x_BLD
  return x_BLD + pos_BLD.astype(x_BLD.dtype)


def constrain(x: Array, names: tuple[str, ...] = (axes.ACT_BATCH, axes.ACT_LENGTH,
                                                  axes.ACT_EMBED)) -> Array:
  return nn.with_logical_constraint(x, names)
