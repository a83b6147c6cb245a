"""Small helpers shared by the models: input checks, decode-time positions, configs."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxformer import axes
from jaxformer.layers import embeddings
from jaxformer.layers.blocks import BlockConfig

Array = jax.Array

def init_block(cfg: Any) -> None:
  """In ``__post_init__``: accepts ``block`` given as a mapping (builds the BlockConfig)."""
  if isinstance(cfg.block, Mapping):
    object.__setattr__(cfg, "block", BlockConfig(**cfg.block))
  if not isinstance(cfg.block, BlockConfig):
    raise TypeError(f"{type(cfg).__name__}.block={cfg.block!r}: expected a BlockConfig "
                    "or a mapping of its fields")


def check_common(cfg: Any) -> None:
  """Validates the fields most model configs share; raises ValueError naming the field.

  Checks ``positions`` and ``embed_dim`` against the block (``block.num_heads`` /
  ``block.head_dim``), after :func:`init_block`.
  """
  init_block(cfg)
  name = type(cfg).__name__
  block = cfg.block
  embeddings.check_position_kind(cfg.positions, field=f"{name}.positions")
  if (isinstance(cfg.embed_dim, bool) or not isinstance(cfg.embed_dim, int)
      or cfg.embed_dim <= 0):
    raise ValueError(f"{name}.embed_dim={cfg.embed_dim!r}: expected a positive int")
  if cfg.embed_dim % block.num_heads and block.head_dim is None:
    raise ValueError(f"{name}.embed_dim={cfg.embed_dim} is not divisible by "
                     f"block.num_heads={block.num_heads}; set block.head_dim or change "
                     "one of them")
  if cfg.positions == "rotary" and block.qk_dim(cfg.embed_dim) % 2:
    raise ValueError(f"{name}.positions='rotary' needs an even block.head_dim, got "
                     f"{block.qk_dim(cfg.embed_dim)}")
  if cfg.positions == "sinusoidal" and cfg.embed_dim % 2:
    raise ValueError(f"{name}.positions='sinusoidal' needs an even embed_dim, "
                     f"got {cfg.embed_dim}")
  if getattr(cfg, "scale_embeddings", None) not in (None, True, False):
    raise TypeError(f"{name}.scale_embeddings={cfg.scale_embeddings!r}: expected None "
                    "(= on with sinusoidal positions) or a bool")


def embeddings_scaled(cfg: Any) -> bool:
  """``cfg.scale_embeddings`` resolved: None means on iff ``positions == "sinusoidal"``.

  The one embedding-scale option of every model that adds positions to its inputs
  (GPT, BERT, ViT, ImageGPT, EncoderDecoder): the Transformer's convention, input
  embeddings initialised at stddev ``embed_dim**-0.5`` and multiplied by
  ``sqrt(embed_dim)``, so that they start at unit scale like the sinusoids added to them
  (at the usual 0.02 init, unit-amplitude sinusoids swamp the tokens).
  """
  value = getattr(cfg, "scale_embeddings", None)
  return cfg.positions == "sinusoidal" if value is None else bool(value)


def token_embedding(cfg: Any, num_embeddings: int, *, stddev: float, name: str | None,
                    **kw: Any) -> embeddings.Embed:
  """The token table of ``cfg``: normal(``stddev``), or with :func:`embeddings_scaled`
  normal(``embed_dim**-0.5``) looked up times ``sqrt(embed_dim)``."""
  scaled = embeddings_scaled(cfg)
  init = nn.initializers.normal(cfg.embed_dim ** -0.5 if scaled else stddev)
  return embeddings.Embed(num_embeddings, cfg.embed_dim, scale_by_sqrt_dim=scaled,
                          embedding_init=init, name=name, **kw)


def scale_input(x_BLD: Array, cfg: Any) -> Array:
  """``x * sqrt(embed_dim)`` when :func:`embeddings_scaled` (inputs not from a table)."""
  if not embeddings_scaled(cfg):
    return x_BLD
  return x_BLD * jnp.asarray(math.sqrt(cfg.embed_dim), x_BLD.dtype)


def check_positive(cfg: Any, *fields: str) -> None:
  """Raises ValueError naming ``Config.field`` unless each field is a positive int."""
  for field in fields:
    value = getattr(cfg, field)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
      raise ValueError(f"{type(cfg).__name__}.{field}={value!r}: expected a positive int")


def replace(cfg: Any, **overrides: Any) -> Any:
  """``dataclasses.replace`` for model configs, as the presets use it.

  Block fields may be given flat (``gpt_tiny(num_heads=4, decode=True)``) or as
  ``block=`` (a BlockConfig, or a mapping of fields to change); both are applied to
  ``cfg.block``. Unknown names raise a TypeError naming the config class.
  """
  fields = {f.name for f in dataclasses.fields(cfg)}
  block_fields = {f.name for f in dataclasses.fields(BlockConfig)}
  unknown = sorted(set(overrides) - fields - block_fields)
  if unknown:
    raise TypeError(f"{type(cfg).__name__} has no field(s) {unknown}; fields: "
                    f"{sorted(fields)}; block fields: {sorted(block_fields)}")
  own = {k: v for k, v in overrides.items() if k in fields}
  flat_block = {k: v for k, v in overrides.items() if k not in fields}
  block = own.pop("block", cfg.block)
  if isinstance(block, Mapping):
    block = dataclasses.replace(cfg.block, **block)
  if flat_block:
    block = dataclasses.replace(block, **flat_block)
  return dataclasses.replace(cfg, block=block, **own)


# Vocabulary rows on GPU/TPU are padded to a multiple of this: matmuls tile well and
# every tensor-parallel size divides it.
ACCELERATOR_VOCAB_MULTIPLE = 128


def vocab_pad_multiple(platform: str, vocab_shards: int = 1) -> int:
  """What a vocabulary is padded to a multiple of on ``platform`` when its rows are
  split ``vocab_shards`` ways: 128 (and the shards) on GPU/TPU; only the shard count
  on a CPU, where padding buys no speed (1 = none)."""
  shards = max(int(vocab_shards), 1)
  if platform == "cpu":
    return shards
  return math.lcm(ACCELERATOR_VOCAB_MULTIPLE, shards)


def padded_size(size: int, multiple: int | None) -> int:
  """``size`` rounded up to a multiple of ``multiple`` (vocabulary padding); None:
  :func:`vocab_pad_multiple` of the default backend, unsharded."""
  if multiple is None:
    multiple = vocab_pad_multiple(jax.default_backend())
  return -(-size // multiple) * multiple


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
  dtype = cfg.block.dtype
  if cfg.positions == "learned":
    pos_BLD = embeddings.LearnedPositionEmbed(
        max_len, x_BLD.shape[-1], dtype=dtype, param_dtype=cfg.block.param_dtype,
        name=name)(positions_BL)
  elif cfg.positions == "sinusoidal":
    pos_BLD = embeddings.sinusoidal_embedding(positions_BL, x_BLD.shape[-1],
                                              dtype=dtype)
  else:
    return x_BLD
  return x_BLD + pos_BLD.astype(x_BLD.dtype)


def constrain(x: Array, names: tuple[str, ...] = (axes.ACT_BATCH, axes.ACT_LENGTH,
                                                  axes.ACT_EMBED)) -> Array:
  return nn.with_logical_constraint(x, names)
