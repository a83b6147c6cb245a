"""Axial Transformers (Ho et al. 2019): images modelled with attention along rows/columns.

Two variants share :class:`AxialTransformerConfig`:

* :class:`AxialClassifier`: ``images [B, H, W, C] -> logits [B, num_classes]``; patches
  (``patch_size=1``: pixels) are embedded, each layer attends along rows then columns
  (unmasked), then a final LN, global average pooling and a linear head.
* :class:`AxialTransformer`: ``ids [B, H, W] -> logits [B, H, W, num_clusters]``, an
  autoregressive model in raster order. The *outer* stack sees the image shifted down
  by one row and attends along rows (unmasked) and along columns (causal): position
  ``(i, j)`` gets a summary of rows ``< i``. The *inner* stack gets the embeddings
  shifted right by one pixel plus that context and attends causally along the row, so
  logits at ``(i, j)`` depend only on pixels before ``(i, j)`` in raster order.

```python
cfg = axial_tiny()
model = AxialTransformer(cfg)
variables = model.init(rng, ids_BHW)
logits_BHWK = model.apply(variables, ids_BHW)      # train with targets = ids_BHW
```
Sampling runs the full forward once per pixel (no KV cache for axial attention).

Attention weights: with ``return_weights=True`` and
``apply(..., mutable=['intermediates'])`` every axial attention sublayer sows its weights as
``intermediates/<layer>/attention_<i>/axial_attention_weights`` (a 1-tuple), of shape
``[B, *other_axes, H, L, L]`` (see ``AxialAttention``), ``<layer>`` being ``layers_<l>``
(classifier) or ``outer_<l>`` / ``inner_<l>`` (generative model). In a block,
``attention_0`` attends along rows (``[B, height, heads, width, width]``) and
``attention_1`` (classifier, outer stack) along columns (``[B, width, heads, height,
height]``). The folded per-line view ``[B * other, H, L, L]`` that
``MultiHeadAttention`` sows is there too, as ``attention_<i>/attention/attention_weights``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxformer import axes
from jaxformer.attention import AxialAttention
from jaxformer.layers import embeddings
from jaxformer.layers.blocks import BlockConfig, residual
from jaxformer.layers.mlp import MLP, dense
from jaxformer.models import common

Array = jax.Array

# Axes of x [B, H, W, D]: "row attention" mixes the pixels of one row (along W, axis 2);
# "column attention" mixes the pixels of one column (along H, axis 1).
ALONG_ROW, ALONG_COLUMN = 2, 1


@dataclasses.dataclass(frozen=True)
class AxialTransformerConfig:
  """Hyper-parameters of both axial variants.

  Attributes:
    image_size: (height, width) of the token grid in pixels (an int means square).
    num_channels / patch_size / num_classes: the classifier's input and head.
    num_clusters: the generative model's vocabulary (color clusters).
    num_layers: classifier depth / the generative outer (context) stack's depth.
    num_inner_layers: the generative inner (row) stack's depth; None = num_layers.
    embed_dim: width.
    positions: "learned" (separate row and column tables, summed) | "none".
    remat: ``nn.remat`` each block; scan_layers: must be False (not implemented).
    block: the axial blocks (pre-LN only; no KV cache): heads, MLP, norms, dropout (also
      on the embeddings), attention options (the scale multiplier is relative to
      ``1/sqrt(embed_dim / num_heads)``), ``return_weights`` (see the module docstring).
  """
  image_size: int | tuple[int, int] = 32
  num_channels: int = 3
  patch_size: int = 1
  num_classes: int = 10
  num_clusters: int = 256
  num_layers: int = 4
  num_inner_layers: int | None = None
  embed_dim: int = 128
  positions: str = "learned"
  remat: bool = False
  scan_layers: bool = False
  block: BlockConfig = dataclasses.field(default_factory=lambda: BlockConfig(
      num_heads=4, mlp_dim=512, activation="gelu", norm="pre", norm_eps=1e-6))

  def __post_init__(self):
    size = self.image_size
    if isinstance(size, int):
      size = (size, size)
    if len(size) != 2 or min(size) < 1:
      raise ValueError(f"AxialTransformerConfig.image_size={self.image_size!r}: expected "
                       "an int or (height, width) of positive ints")
    object.__setattr__(self, "image_size", tuple(size))
    common.check_common(self)
    if self.positions not in ("learned", "none"):
      raise ValueError(f"AxialTransformerConfig.positions={self.positions!r}: expected "
                       "'learned' or 'none'")
    if self.block.norm != "pre":
      raise ValueError(f"AxialTransformerConfig.block.norm={self.block.norm!r}: only "
                       "'pre' is implemented")
    if self.block.decode:
      raise ValueError("AxialTransformerConfig.block.decode=True: the axial models have "
                       "no KV cache (sampling runs the full forward per pixel)")
    if self.scan_layers:
      raise ValueError("AxialTransformerConfig.scan_layers=True is not supported; "
                       "expected False")
    if size[0] % self.patch_size or size[1] % self.patch_size:
      raise ValueError(f"AxialTransformerConfig.image_size={size} is not divisible by "
                       f"patch_size={self.patch_size}")


class AxialBlock(nn.Module):
  """Pre-LN residual axial attention along each of ``attend_axes``, then an MLP.

  ``x [B, H, W, D] -> [B, H, W, D]``; ``causal[i]`` makes attention along
  ``attend_axes[i]`` causal. With ``config.return_weights`` sublayer ``attention_i``
  sows ``axial_attention_weights`` ``[B, *other_axes, heads, L, L]``.
  """
  config: BlockConfig
  attend_axes: Sequence[int]
  causal: Sequence[bool]

  @nn.compact
  def __call__(self, x_BHWD: Array, deterministic: bool = True) -> Array:
    c = self.config
    kw = dict(dtype=c.dtype, param_dtype=c.param_dtype)
    for i, (axis, causal) in enumerate(zip(self.attend_axes, self.causal)):
      attention = AxialAttention(num_heads=c.num_heads, axis=axis, is_causal=causal,
                                 attention_kwargs=c.attention_kwargs(x_BHWD.shape[-1]),
                                 name=f"attention_{i}")

      def attend(h, attention=attention):
        out = attention(h, deterministic=deterministic, return_weights=c.return_weights)
        return out[0] if c.return_weights else out
      x_BHWD = residual(c, x_BHWD, attend, f"attention_norm_{i}", deterministic,
                        act_axes=None)
    mlp = MLP(c.mlp_dim, activation=c.activation, use_bias=c.use_bias, name="mlp",
              **c.kernel_init(), **c.out_kernel_init(), **kw)
    return residual(c, x_BHWD, lambda h: mlp(h, deterministic), "mlp_norm",
                    deterministic, act_axes=None)


def _axial_stack(cfg: AxialTransformerConfig, x_BHWD: Array, num_layers: int,
                 attend_axes: Sequence[int], causal: Sequence[bool], prefix: str,
                 deterministic: bool) -> Array:
  block_cls = nn.remat(AxialBlock, static_argnums=(2,)) if cfg.remat else AxialBlock
  for i in range(num_layers):
    x_BHWD = block_cls(cfg.block, tuple(attend_axes), tuple(causal), name=f"{prefix}_{i}")(
        x_BHWD, deterministic)
  return x_BHWD


def _add_axial_positions(x_BHWD: Array, cfg: AxialTransformerConfig, name: str) -> Array:
  """Adds a learned row table [H, D] and column table [W, D] (broadcast over the grid)."""
  if cfg.positions == "none":
    return x_BHWD
  _, h, w, d = x_BHWD.shape
  kw = dict(dtype=cfg.block.dtype, param_dtype=cfg.block.param_dtype)
  rows_HD = embeddings.LearnedPositionEmbed(h, d, name=f"{name}_rows", **kw)(
      jnp.arange(h, dtype=jnp.int32)[None, :])[0]
  cols_WD = embeddings.LearnedPositionEmbed(w, d, name=f"{name}_cols", **kw)(
      jnp.arange(w, dtype=jnp.int32)[None, :])[0]
  return x_BHWD + (rows_HD[:, None, :] + cols_WD[None, :, :])[None].astype(x_BHWD.dtype)


class AxialClassifier(nn.Module):
  """``images [B, H, W, C] -> float32 logits [B, num_classes]`` with axial attention."""
  config: AxialTransformerConfig

  @nn.compact
  def __call__(self, images_BHWC: Array, deterministic: bool = True) -> Array:
    cfg = self.config
    expected = (*cfg.image_size, cfg.num_channels)
    if images_BHWC.ndim != 4 or tuple(images_BHWC.shape[1:]) != expected:
      raise ValueError(f"AxialClassifier: images must be [batch, *{expected}], got "
                       f"shape {images_BHWC.shape}")
    kw = dict(dtype=cfg.block.dtype, param_dtype=cfg.block.param_dtype)
    b = images_BHWC.shape[0]
    gh, gw = cfg.image_size[0] // cfg.patch_size, cfg.image_size[1] // cfg.patch_size
    x = embeddings.PatchEmbed(cfg.patch_size, cfg.embed_dim, name="patch_embedding",
                              **kw)(images_BHWC)
    x_BHWD = _add_axial_positions(x.reshape(b, gh, gw, cfg.embed_dim), cfg, "position")
    x_BHWD = nn.Dropout(cfg.block.dropout_rate)(x_BHWD, deterministic=deterministic)
    x_BHWD = _axial_stack(cfg, x_BHWD, cfg.num_layers, (ALONG_ROW, ALONG_COLUMN),
                          (False, False),
                          "layers", deterministic)
    x_BHWD = cfg.block.make_norm("final_norm")(x_BHWD)
    pooled_BD = x_BHWD.mean(axis=(1, 2))
    return dense(cfg.num_classes, axes.EMBED, axes.VOCAB, use_bias=True,
                 kernel_init=nn.initializers.lecun_normal(), name="head",
                 **kw)(pooled_BD).astype(jnp.float32)


class AxialTransformer(nn.Module):
  """Autoregressive (raster order) ``ids [B, H, W] -> float32 logits [B, H, W, K]``.

  Params: ``token_embedding``, ``outer_position_rows/cols``, ``outer_i``,
  ``inner_position_rows/cols``, ``inner_i``, ``final_norm``, ``head``.
  """
  config: AxialTransformerConfig

  @nn.compact
  def __call__(self, ids_BHW: Array, deterministic: bool = True) -> Array:
    cfg = self.config
    common.check_tokens("ids", ids_BHW, ndim=3)
    if tuple(ids_BHW.shape[1:]) != cfg.image_size:
      raise ValueError(f"AxialTransformer: ids must be [batch, *{cfg.image_size}], got "
                       f"shape {ids_BHW.shape}")
    kw = dict(dtype=cfg.block.dtype, param_dtype=cfg.block.param_dtype)
    drop = nn.Dropout(cfg.block.dropout_rate)
    e_BHWD = embeddings.Embed(cfg.num_clusters, cfg.embed_dim, name="token_embedding",
                              **kw)(ids_BHW)
    # Outer: rows < i. Shift down one row, unmasked row attention, causal column attention.
    u_BHWD = jnp.pad(e_BHWD[:, :-1], ((0, 0), (1, 0), (0, 0), (0, 0)))
    u_BHWD = drop(_add_axial_positions(u_BHWD, cfg, "outer_position"),
                  deterministic=deterministic)
    u_BHWD = _axial_stack(cfg, u_BHWD, cfg.num_layers, (ALONG_ROW, ALONG_COLUMN),
                          (False, True),
                          "outer", deterministic)
    # Inner: pixels (i, < j) plus the context; causal attention along the row.
    h_BHWD = jnp.pad(e_BHWD[:, :, :-1], ((0, 0), (0, 0), (1, 0), (0, 0)))
    h_BHWD = drop(_add_axial_positions(h_BHWD, cfg, "inner_position"),
                  deterministic=deterministic) + u_BHWD
    num_inner = cfg.num_layers if cfg.num_inner_layers is None else cfg.num_inner_layers
    h_BHWD = _axial_stack(cfg, h_BHWD, num_inner, (ALONG_ROW,), (True,), "inner",
                          deterministic)
    h_BHWD = cfg.block.make_norm("final_norm")(h_BHWD)
    return dense(cfg.num_clusters, axes.EMBED, axes.VOCAB, use_bias=True,
                 kernel_init=nn.initializers.lecun_normal(), name="head",
                 **kw)(h_BHWD).astype(jnp.float32)


# --- presets ----------------------------------------------------------------------------

def axial_tiny(**overrides: Any) -> AxialTransformerConfig:
  """Test-sized: 4 x 4 grid, 3 channels, 10 classes, 16 clusters, 1 layer x 16, 2 heads."""
  cfg = common.replace(AxialTransformerConfig(), image_size=4, num_classes=10,
                       num_clusters=16, num_layers=1, embed_dim=16, num_heads=2,
                       mlp_dim=32)
  return common.replace(cfg, **overrides)


def axial_cifar10(**overrides: Any) -> AxialTransformerConfig:
  """32 x 32 x 3 classification / 256-level generation, 4 layers x 128, 4 heads."""
  return common.replace(AxialTransformerConfig(), **overrides)
