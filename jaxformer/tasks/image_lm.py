"""Generative image models: pixels as palette ids, predicted in raster order.

Pixels in ``[0, 1]`` (the ``image`` pipeline with ``data.mean=0, data.std=1``) are
rounded per channel to ``task_options.levels`` evenly spaced values; the palette ids
(``levels ** channels`` = ``model.num_clusters``) are modelled autoregressively, by
ImageGPT (``image_lm``: a GPT over the flattened ids) or the Axial Transformer
(``axial_lm``: causal axial attention over the ``[H, W]`` grid). Metrics: ``loss``,
``nll``, ``accuracy``, ``bits_per_token`` (bits per pixel), ``num_tokens`` (pixels).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxformer.models import image_gpt
from jaxformer.objectives import causal_lm
from jaxformer.tasks import base
from jaxformer.tasks import classification


def grid_palette(levels: int, channels: int) -> np.ndarray:
  """``levels ** channels`` colors in ``[0, 1]^channels`` on a regular grid.

  Color ``k`` has channel ``c`` at level ``(k // levels**c) % levels``, so
  :func:`jaxformer.models.color_quantize` with this palette rounds every channel to the
  nearest of ``levels`` evenly spaced values.
  """
  if levels < 2 or channels < 1:
    raise ValueError(f"grid_palette: levels={levels} must be >= 2 and channels="
                     f"{channels} >= 1")
  k = np.arange(levels ** channels)
  digits = np.stack([(k // levels ** c) % levels for c in range(channels)], axis=-1)
  return (digits / (levels - 1)).astype(np.float32)


def quantize_images(images_BHWC: jax.Array, *, levels: int,
                    num_clusters: int) -> jax.Array:
  """Pixels in ``[0, 1]`` -> palette ids ``[B, H, W]`` of the ``levels``-grid palette.

  Raises ValueError unless ``num_clusters == levels ** channels``.
  """
  channels = images_BHWC.shape[-1]
  if levels ** channels != num_clusters:
    raise ValueError(
        f"task_options.levels={levels} gives {levels}**{channels} = "
        f"{levels ** channels} colors for {channels}-channel images, but "
        f"model.num_clusters={num_clusters}; they must be equal")
  palette_KC = jnp.asarray(grid_palette(levels, channels))
  return image_gpt.color_quantize(jnp.clip(images_BHWC, 0.0, 1.0), palette_KC)


def _pixel_weights(batch: base.Batch, shape: tuple[int, int]) -> jax.Array:
  w_B = batch.get("weights")
  if w_B is None:
    return jnp.ones(shape, jnp.float32)
  return jnp.broadcast_to(jnp.asarray(w_B, jnp.float32)[:, None], shape)


class ImageLM(base.Task):
  """ImageGPT: next-pixel prediction over palette ids in raster order."""

  @dataclasses.dataclass(frozen=True, kw_only=True)
  class Options:
    levels: int = 4

  name = "image_lm"
  Data = classification.ImageData

  def batches(self, *, batch_size: int, seed: int, train: bool) -> Any:
    return classification.image_batches(self, batch_size=batch_size, seed=seed,
                                        train=train)

  def example_length(self) -> int:
    return classification.image_length(self.model_config)

  def ids(self, batch: base.Batch) -> jax.Array:
    """The batch's images as palette ids ``[B, H, W]``."""
    return quantize_images(jnp.asarray(batch["image"]), levels=self.options.levels,
                           num_clusters=self.model_config.num_clusters)

  def model_inputs(self, batch: base.Batch) -> tuple[Any, ...]:
    inputs_BL, _ = image_gpt.image_gpt_inputs(self.ids(batch), self.model_config)
    return (inputs_BL,)

  def loss(self, model: nn.Module, params: Any, batch: base.Batch,
           rng: jax.Array | None, deterministic: bool
           ) -> tuple[jax.Array, base.Metrics]:
    inputs_BL, targets_BL = image_gpt.image_gpt_inputs(self.ids(batch),
                                                       self.model_config)
    logits_BLK = model.apply({"params": params}, inputs_BL,
                             deterministic=deterministic,
                             rngs=base.rngs(rng, deterministic))
    return causal_lm.loss(logits_BLK, targets_BL,
                          _pixel_weights(batch, targets_BL.shape))


class AxialLM(ImageLM):
  """Axial Transformer: ids ``[B, H, W]`` -> logits ``[B, H, W, K]`` where a pixel's
  logits see only earlier pixels, so the targets are the ids themselves."""

  name = "axial_lm"

  def model_inputs(self, batch: base.Batch) -> tuple[Any, ...]:
    return (self.ids(batch),)

  def loss(self, model: nn.Module, params: Any, batch: base.Batch,
           rng: jax.Array | None, deterministic: bool
           ) -> tuple[jax.Array, base.Metrics]:
    ids_BHW = self.ids(batch)
    logits_BHWK = self.apply(model, params, batch, rng, deterministic)
    b, h, w, k = logits_BHWK.shape
    targets_BL = ids_BHW.reshape(b, h * w)
    return causal_lm.loss(logits_BHWK.reshape(b, h * w, k), targets_BL,
                          _pixel_weights(batch, targets_BL.shape))
