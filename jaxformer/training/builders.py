"""From config sections to objects: model, tokenizer, data iterators.

Each kind of thing is chosen by a name looked up in a plain dict (``MODELS``,
``SOURCES``, ``TOKENIZERS``); the rest of the section is passed whole to the chosen
constructor. Add an entry here to make a new model / source usable from a config.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxformer.data import embedded
from jaxformer.data import pipeline
from jaxformer.data import tokenizers
from jaxformer.models import gpt

# name -> (config dataclass, module class)
MODELS: dict[str, tuple[type[Any], type[nn.Module]]] = {
    "gpt": (gpt.GPTConfig, gpt.GPT),
}

# name -> split -> random-access source
SOURCES: dict[str, Callable[[str], Any]] = {
    "stdlib_text": embedded.stdlib_text_source,
}

TOKENIZERS: dict[str, Callable[[], tokenizers.Tokenizer]] = {
    "bytes": tokenizers.ByteTokenizer,
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


def build_tokenizer(section: Mapping[str, Any]) -> tokenizers.Tokenizer:
  return _lookup(TOKENIZERS, section["tokenizer"], "data.tokenizer")()


def build_source(section: Mapping[str, Any], split: str) -> Any:
  return _lookup(SOURCES, section["source"], "data.source")(split)


def per_process_batch(global_batch: int, divisor: int) -> int:
  """This process's share of the global batch (ValueError if it does not divide)."""
  count = jax.process_count()
  if global_batch % count or global_batch % divisor:
    raise ValueError(
        f"data.batch_size={global_batch} must be divisible by the process count "
        f"({count}) and by the mesh's data x fsdp size ({divisor})")
  return global_batch // count


def train_iterator(section: Mapping[str, Any], tokenizer: tokenizers.Tokenizer, *,
                   batch_size: int, seed: int):
  """Endless shuffled, packed LM batches of this process's shard of the train split."""
  return pipeline.lm_pipeline(
      build_source(section, section.get("train_split", "train")), tokenizer,
      seq_len=section["seq_len"], batch_size=batch_size, seed=seed,
      shard_index=jax.process_index(), shard_count=jax.process_count(),
      pack=section.get("pack", True), prefetch=section.get("prefetch", 0))


def eval_iterator(section: Mapping[str, Any], tokenizer: tokenizers.Tokenizer, *,
                  batch_size: int):
  """The held-out split in a fixed order (unshuffled, densely packed, one stream).

  Repeats after a full pass, so every process can always take the same number of
  batches (shards of the split may differ in size).
  """
  return pipeline.lm_pipeline(
      build_source(section, section.get("eval_split", "validation")), tokenizer,
      seq_len=section["seq_len"], batch_size=batch_size, seed=0,
      shard_index=jax.process_index(), shard_count=jax.process_count(),
      pack=section.get("pack", True), num_epochs=None, shuffle=False, streams=1)
