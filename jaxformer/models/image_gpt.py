"""ImageGPT: autoregressive generation of images as 1-D sequences of color clusters.

Pixels are mapped to the nearest of ``num_clusters`` palette colors
(:func:`color_quantize`), flattened in raster order and modelled by a GPT decoder with
its own vocabulary (the clusters + a start-of-image token), learned positions over
``height * width`` and an untied head over the clusters (Chen et al. 2020).

```python
cfg = image_gpt_tiny()
model = ImageGPT(cfg)
inputs_BL, targets_BL = image_gpt_inputs(cluster_ids_BHW, cfg)   # SOS-shifted
variables = model.init(rng, inputs_BL)
logits_BLC = model.apply(variables, inputs_BL)    # [B, H*W, num_clusters] float32
```
Sampling: ``ImageGPT(image_gpt_tiny(decode=True))``; init with a full-length input, feed
SOS then each sampled cluster one step at a time with ``mutable=['cache']``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxformer.layers.blocks import BlockConfig
from jaxformer.models import common
from jaxformer.models.gpt import GPT, GPTConfig

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class ImageGPTConfig:
  """ImageGPT hyper-parameters (defaults: iGPT-S on 32 x 32 images, 512 clusters).

  Attributes:
    image_size: (height, width) in pixels (an int means square).
    num_clusters: color palette size; the input vocabulary adds one SOS token
      (id ``num_clusters``).
    num_layers / embed_dim: the decoder's depth and width.
    positions: "learned" (iGPT) | "sinusoidal" | "rotary" | "none".
    scale_embeddings: as GPTConfig (None: on exactly with sinusoidal positions).
    scaled_residual_init, vocab_pad_multiple, remat, scan_layers: as GPTConfig.
    block: the decoder blocks (GPT-2 blocks, pre-LN), as GPTConfig.block; its
      ``decode`` switches on KV-cache sampling.
  """
  image_size: int | tuple[int, int] = 32
  num_clusters: int = 512
  num_layers: int = 24
  embed_dim: int = 512
  positions: str = "learned"
  scale_embeddings: bool | None = None
  scaled_residual_init: bool = True
  vocab_pad_multiple: int | None = None
  remat: bool = False
  scan_layers: bool = False
  block: BlockConfig = dataclasses.field(default_factory=lambda: BlockConfig(
      num_heads=8, mlp_dim=2048, activation="gelu", norm="pre", init_stddev=0.02))

  def __post_init__(self):
    size = self.image_size
    if isinstance(size, int):
      size = (size, size)
    if len(size) != 2 or min(size) < 1:
      raise ValueError(f"ImageGPTConfig.image_size={self.image_size!r}: expected an int "
                       "or (height, width) of positive ints")
    object.__setattr__(self, "image_size", tuple(size))
    if not isinstance(self.num_clusters, int) or self.num_clusters < 2:
      raise ValueError(f"ImageGPTConfig.num_clusters={self.num_clusters!r}: expected an "
                       "int >= 2")
    common.init_block(self)
    try:
      self.gpt_config()  # validates the rest
    except (TypeError, ValueError) as e:
      raise type(e)(str(e).replace("GPTConfig.", "ImageGPTConfig.")) from None

  @property
  def seq_len(self) -> int:
    return self.image_size[0] * self.image_size[1]

  @property
  def sos_id(self) -> int:
    return self.num_clusters

  def num_padding_params(self) -> int:
    return self.gpt_config().num_padding_params()

  def gpt_config(self) -> GPTConfig:
    """The GPT this model runs (its own vocabulary, positions and untied head)."""
    return GPTConfig(
        vocab_size=self.num_clusters + 1, output_vocab_size=self.num_clusters,
        tie_embeddings=False, max_len=self.seq_len, num_layers=self.num_layers,
        embed_dim=self.embed_dim, positions=self.positions,
        scale_embeddings=self.scale_embeddings,
        scaled_residual_init=self.scaled_residual_init,
        vocab_pad_multiple=self.vocab_pad_multiple, remat=self.remat,
        scan_layers=self.scan_layers, block=self.block)


def color_quantize(images_BHWC: Array, palette_KC: Array) -> Array:
  """Nearest palette color (squared Euclidean) of every pixel -> int32 ids [B, H, W]."""
  images = jnp.asarray(images_BHWC, jnp.float32)
  palette = jnp.asarray(palette_KC, jnp.float32)
  if images.shape[-1] != palette.shape[-1]:
    raise ValueError(f"color_quantize: images have {images.shape[-1]} channels, palette "
                     f"has {palette.shape[-1]}")
  d = (jnp.sum(images ** 2, axis=-1, keepdims=True)
       - 2.0 * jnp.einsum("...c,kc->...k", images, palette)
       + jnp.sum(palette ** 2, axis=-1)[None, None, None, :])
  return jnp.argmin(d, axis=-1).astype(jnp.int32)


def color_dequantize(ids_BHW: Array, palette_KC: Array) -> Array:
  """Cluster ids [B, H, W] -> palette colors [B, H, W, C]."""
  return jnp.take(jnp.asarray(palette_KC), ids_BHW, axis=0)


def image_gpt_inputs(ids_BHW: Array, cfg: ImageGPTConfig) -> tuple[Array, Array]:
  """Cluster ids [B, H, W] -> (inputs [B, H*W] = SOS + ids[:-1], targets [B, H*W])."""
  if tuple(ids_BHW.shape[1:]) != cfg.image_size:
    raise ValueError(f"image_gpt_inputs: ids shape {ids_BHW.shape} does not match "
                     f"image_size={cfg.image_size}")
  targets_BL = ids_BHW.reshape(ids_BHW.shape[0], -1).astype(jnp.int32)
  sos_B1 = jnp.full((targets_BL.shape[0], 1), cfg.sos_id, jnp.int32)
  return jnp.concatenate([sos_B1, targets_BL[:, :-1]], axis=1), targets_BL


class ImageGPT(nn.Module):
  """``inputs [B, L] (SOS-shifted cluster ids, L <= H*W) -> logits [B, L, num_clusters]``.

  A GPT decoder (params under ``gpt``) with vocabulary ``num_clusters + 1``, positions
  over ``H * W`` and an untied head over the clusters.
  """
  config: ImageGPTConfig

  @nn.compact
  def __call__(self, inputs_BL: Array, positions: Array | None = None,
               deterministic: bool = True) -> Array:
    return GPT(self.config.gpt_config(), name="gpt")(
        inputs_BL, positions=positions, deterministic=deterministic)


# --- presets ----------------------------------------------------------------------------

def image_gpt_small(**overrides: Any) -> ImageGPTConfig:
  """iGPT-S: 24 layers x 512, 8 heads, 32 x 32 images, 512 clusters."""
  return common.replace(ImageGPTConfig(), **overrides)


def image_gpt_tiny(**overrides: Any) -> ImageGPTConfig:
  """Test-sized: 4 x 4 images, 16 clusters, 2 layers x 32 wide, 2 heads."""
  cfg = common.replace(ImageGPTConfig(), image_size=4, num_clusters=16, num_layers=2,
                       embed_dim=32, num_heads=2, mlp_dim=64)
  return common.replace(cfg, **overrides)
