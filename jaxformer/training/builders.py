"""``config.model`` -> the model's config and module (``MODELS``)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from jaxformer.models import axial_transformer
from jaxformer.models import bert
from jaxformer.models import encoder_decoder
from jaxformer.models import gpt
from jaxformer.models import image_gpt
from jaxformer.models import vit

# name -> (config dataclass, module class)
MODELS: dict[str, tuple[type[Any], type[nn.Module]]] = {
    "gpt": (gpt.GPTConfig, gpt.GPT),
    "bert": (bert.BERTConfig, bert.BERT),
    "encoder_decoder": (encoder_decoder.EncoderDecoderConfig,
                        encoder_decoder.EncoderDecoder),
    "vit": (vit.ViTConfig, vit.ViT),
    "image_gpt": (image_gpt.ImageGPTConfig, image_gpt.ImageGPT),
    "axial_transformer": (axial_transformer.AxialTransformerConfig,
                          axial_transformer.AxialTransformer),
    "axial_classifier": (axial_transformer.AxialTransformerConfig,
                         axial_transformer.AxialClassifier),
}

_DTYPE_FIELDS = ("dtype", "param_dtype")


def _lookup(table: Mapping[str, Any], key: str, field: str) -> Any:
  try:
    return table[key]
  except KeyError:
    raise ValueError(f"{field}={key!r} is not known; known: {sorted(table)}") from None


def model_config(section: Mapping[str, Any]) -> Any:
  """The model's frozen config dataclass from ``config.model``.

  ``section["name"]`` picks the model (``MODELS``); the other keys are the dataclass's
  fields, with dtypes given as strings (``"bfloat16"``).
  """
  fields = dict(section)
  name = fields.pop("name", None)
  cfg_cls, _ = _lookup(MODELS, name, "model.name")
  valid = {f.name for f in dataclasses.fields(cfg_cls)}
  unknown = sorted(set(fields) - valid)
  if unknown:
    raise ValueError(f"model fields {unknown} are not fields of "
                     f"{cfg_cls.__name__}; valid: {sorted(valid)}")
  for key in _DTYPE_FIELDS:
    if isinstance(fields.get(key), str):
      try:
        fields[key] = jnp.dtype(fields[key])
      except TypeError:
        raise ValueError(f"model.{key}={fields[key]!r} is not a dtype name "
                         "(e.g. 'float32', 'bfloat16')") from None
  return cfg_cls(**fields)


def build_model(section: Mapping[str, Any]) -> tuple[Any, nn.Module]:
  """``(model_config, module)`` from ``config.model``."""
  cfg = model_config(section)
  _, module_cls = MODELS[section["name"]]
  return cfg, module_cls(cfg)
