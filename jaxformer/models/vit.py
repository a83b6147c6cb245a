"""ViT: Vision Transformer (Dosovitskiy et al. 2020).

```python
cfg = vit_b16(num_classes=1000)            # 224 x 224, patch 16, 12 x 768
model = ViT(cfg)
variables = model.init(rng, images_BHWC)    # float images [B, 224, 224, 3]
logits_BC = model.apply(variables, images_BHWC, deterministic=True)   # float32
```
Patches -> linear embedding, a learned [CLS] token, learned positions, pre-LN encoder
with a final LN, and a linear head on the [CLS] output (``pooling="mean"``: global
average of the patch outputs instead). ``num_classes=0`` returns the pooled features.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxformer import axes
from jaxformer.layers import embeddings
from jaxformer.layers.blocks import BlockConfig, EncoderBlock, Stack
from jaxformer.layers.mlp import dense
from jaxformer.models import common

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class ViTConfig:
  """ViT hyper-parameters (defaults: ViT-B/16 at 224, 1000 classes); blocks in ``block``.

  Attributes:
    image_size: square input side; patch_size: patch side; num_channels: input channels.
    num_classes: head outputs (0: no head, return pooled features [B, D]).
    num_layers / embed_dim: the encoder's depth and width.
    positions: "learned" (ViT; one row per patch + CLS) | "sinusoidal" | "rotary" | "none".
    scale_embeddings: the Transformer's convention on the patch projection: its kernel
      initialised ``sqrt(embed_dim)`` times smaller than lecun-normal and its output
      multiplied by ``sqrt(embed_dim)`` (same scale at init as without; the projection
      then learns at the scaled rate, as a scaled token table does). None (default) = on
      exactly when ``positions == "sinusoidal"`` (see ``common.embeddings_scaled``).
    pooling: "cls" ([CLS] token, ViT) | "mean" (global average pool, no CLS token).
    head_zero_init: zero-initialised head (big_vision's fine-tuning default).
    remat / scan_layers: as GPTConfig.
    block: the encoder blocks; ViT: gelu_exact, pre-LN (final LN), norm_eps 1e-6, no
      dropout for ImageNet-21k ViT-B (``dropout_rate`` also on the embeddings), xavier
      init.
  """
  image_size: int = 224
  patch_size: int = 16
  num_channels: int = 3
  num_classes: int = 1000
  num_layers: int = 12
  embed_dim: int = 768
  positions: str = "learned"
  scale_embeddings: bool | None = None
  pooling: str = "cls"
  head_zero_init: bool = True
  remat: bool = False
  scan_layers: bool = False
  block: BlockConfig = dataclasses.field(default_factory=lambda: BlockConfig(
      num_heads=12, mlp_dim=3072, activation="gelu_exact", norm="pre", norm_eps=1e-6))

  def __post_init__(self):
    common.check_common(self)
    common.check_positive(self, "image_size", "patch_size", "num_channels")
    if self.image_size % self.patch_size:
      raise ValueError(f"ViTConfig.image_size={self.image_size} is not divisible by "
                       f"patch_size={self.patch_size}")
    if self.pooling not in ("cls", "mean"):
      raise ValueError(f"ViTConfig.pooling={self.pooling!r}: expected 'cls' or 'mean'")

  @property
  def num_patches(self) -> int:
    return (self.image_size // self.patch_size) ** 2

  @property
  def seq_len(self) -> int:
    return self.num_patches + (self.pooling == "cls")


class ViT(nn.Module):
  """``images [B, H, W, C] -> float32 logits [B, num_classes]``.

  Params: ``patch_embedding``, ``cls_token``, ``position_embedding``, ``encoder``
  (with ``final_norm``), ``head``.
  """
  config: ViTConfig

  @nn.compact
  def __call__(self, images_BHWC: Array, deterministic: bool = True) -> Array:
    cfg = self.config
    expected = (cfg.image_size, cfg.image_size, cfg.num_channels)
    if images_BHWC.ndim != 4 or images_BHWC.shape[1:] != expected:
      raise ValueError(f"ViT: images must be [batch, {expected[0]}, {expected[1]}, "
                       f"{expected[2]}] for this config, got shape {images_BHWC.shape}")
    kw = dict(dtype=cfg.block.dtype, param_dtype=cfg.block.param_dtype)
    kernel_init = (nn.initializers.variance_scaling(1.0 / cfg.embed_dim, "fan_in",
                                                    "truncated_normal")
                   if common.embeddings_scaled(cfg) else nn.initializers.lecun_normal())
    x_BND = embeddings.PatchEmbed(cfg.patch_size, cfg.embed_dim, name="patch_embedding",
                                  kernel_init=kernel_init, **kw)(images_BHWC)
    x_BND = common.scale_input(x_BND, cfg)
    batch = x_BND.shape[0]
    if cfg.pooling == "cls":
      cls_11D = self.param("cls_token", nn.with_logical_partitioning(
          nn.initializers.zeros, (None, None, axes.EMBED)), (1, 1, cfg.embed_dim),
                           cfg.block.param_dtype)
      cls_B1D = jnp.broadcast_to(jnp.asarray(cls_11D, cfg.block.dtype),
                                 (batch, 1, cfg.embed_dim))
      x_BND = jnp.concatenate([cls_B1D, x_BND], axis=1)
    positions_BN = embeddings.default_positions(x_BND)
    x_BND = common.add_positions(x_BND, positions_BN, cfg, cfg.seq_len)
    x_BND = nn.Dropout(cfg.block.dropout_rate)(x_BND, deterministic=deterministic)
    x_BND = common.constrain(x_BND)
    h_BND = Stack(EncoderBlock, cfg.block, cfg.num_layers, remat=cfg.remat,
                  scan=cfg.scan_layers, block_kwargs={"rotary": cfg.positions == "rotary"},
                  name="encoder")(
                      x_BND, None, None, positions_BN, deterministic=deterministic)
    pooled_BD = h_BND[:, 0] if cfg.pooling == "cls" else h_BND.mean(axis=1)
    if not cfg.num_classes:
      return pooled_BD.astype(jnp.float32)
    head_init = (nn.initializers.zeros if cfg.head_zero_init
                 else nn.initializers.lecun_normal())
    logits = dense(cfg.num_classes, axes.EMBED, axes.VOCAB, use_bias=True,
                   kernel_init=head_init, name="head", **kw)(pooled_BD)
    return logits.astype(jnp.float32)


# --- presets ----------------------------------------------------------------------------

def vit_b16(num_classes: int = 1000, **overrides: Any) -> ViTConfig:
  """ViT-B/16 at 224 x 224: 12 x 768, 12 heads, MLP 3072 (86,567,656 params at 1000)."""
  return common.replace(ViTConfig(), num_classes=num_classes, **overrides)


def vit_s16(num_classes: int = 1000, **overrides: Any) -> ViTConfig:
  """ViT-S/16: 12 x 384, 6 heads, MLP 1536."""
  sizes = dict(embed_dim=384, num_heads=6, mlp_dim=1536)
  return vit_b16(num_classes, **{**sizes, **overrides})


def vit_l16(num_classes: int = 1000, **overrides: Any) -> ViTConfig:
  """ViT-L/16: 24 x 1024, 16 heads, MLP 4096."""
  sizes = dict(num_layers=24, embed_dim=1024, num_heads=16, mlp_dim=4096)
  return vit_b16(num_classes, **{**sizes, **overrides})


def vit_tiny(num_classes: int = 10, **overrides: Any) -> ViTConfig:
  """Test-sized: 8 x 8 x 3 images, patch 4 (4 patches), 2 layers x 32 wide, 2 heads."""
  cfg = common.replace(ViTConfig(), image_size=8, patch_size=4, num_classes=num_classes,
                       num_layers=2, embed_dim=32, num_heads=2, mlp_dim=64,
                       head_zero_init=False)
  return common.replace(cfg, **overrides)
