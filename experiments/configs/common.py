"""Sections shared by the experiment configs: the model from a preset, optimizer, train,
sharding, distributed.

A config names a model preset and states only what differs
(``model("gpt_nano", block=dict(dropout_rate=0.1))``), and takes the other sections
with the overrides it needs (``train(num_steps=300, log_every=25)``). Every field can be
overridden on the command line: ``--config.model.block.num_heads=8``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ml_collections import config_dict

from jaxformer.layers.blocks import BlockConfig
from jaxformer.models import registry

# An unset (None) field becomes a typed placeholder so the command line can set it.
_TYPES = (("bool", bool), ("int", int), ("float", float), ("str", str))


def _placeholders(d: dict[str, Any], cls: type) -> dict[str, Any]:
  types = {f.name: str(f.type) for f in dataclasses.fields(cls)}
  out = {}
  for key, value in d.items():
    if key == "block" and isinstance(value, dict):
      value = _placeholders(value, BlockConfig)
    elif key == "attention_hard":
      # False | True | "straight_through": typed object so that either kind can be set
      # (the CLI still reads "True"/"false" as bools).
      value = config_dict.FieldReference(value, field_type=object)
    elif value is None:
      words = types.get(key, "").replace("|", " ").replace("[", " ").split()
      kind = next((t for name, t in _TYPES if name in words), object)
      value = config_dict.placeholder(kind)
    out[key] = value
  return out


def model(preset: str, **overrides: Any) -> config_dict.ConfigDict:
  """The ``model`` section: preset ``preset`` (``jaxformer.models.registry.PRESETS``)
  with ``overrides`` (nested ``block=dict(...)``), every field spelled out."""
  return model_section(registry.preset_dict(preset, **overrides))


def model_section(d: dict[str, Any]) -> config_dict.ConfigDict:
  """A complete model dict (``{"name": ..., ...}``, e.g. another config's
  ``model.to_dict()``) as a ``model`` section whose unset fields the CLI can set."""
  cfg_cls, _ = registry.MODELS[d["name"]]
  return config_dict.ConfigDict(_placeholders(d, cfg_cls))

VARIANTS = ("", "tiny", "runlocal")


def variant(arg: str | None, name: str) -> str:
  """``"tiny"`` for ``"tiny"``/``"runlocal"``, ``""`` for the real size; else ValueError."""
  value = (arg or "").strip()
  if value not in VARIANTS:
    raise ValueError(f"{name} config arg {arg!r} is not one of {VARIANTS}")
  return "tiny" if value else ""


def optimizer(**overrides: Any) -> config_dict.ConfigDict:
  """AdamW with warmup + cosine decay, clipping at 1.0 (``OptimizerConfig`` fields)."""
  c = config_dict.ConfigDict(dict(
      learning_rate=1e-3,
      schedule="cosine",
      warmup_steps=100,
      end_lr_fraction=0.1,
      b1=0.9,
      b2=0.999,
      eps=1e-8,
      weight_decay=0.01,
      grad_clip_norm=1.0,
      grad_accum_steps=1,
      spike_factor=config_dict.placeholder(float),   # e.g. 3.0 to skip loss spikes
      spike_warmup_steps=100,
      max_consecutive_spikes=10,
      loss_ema_decay=0.99,
  ))
  c.update(overrides)
  return c


def train(**overrides: Any) -> config_dict.ConfigDict:
  """Loop settings; no text sample (only causal LM configs generate one)."""
  c = config_dict.ConfigDict(dict(
      num_steps=10_000,
      seed=0,
      log_every=100,
      eval_every=1000,
      eval_batches=20,
      checkpoint_every=1000,
      keep_checkpoints=2,
      async_checkpoint=True,
      progress=config_dict.placeholder(bool),  # None: a bar iff stdout is a TTY
      tensorboard=True,
      sample_tokens=0,                         # > 0: a sample at the end (LM tasks)
      max_consecutive_skipped=20,  # stop a diverged run (None: never)
      allow_config_changes=(),     # keys that may change on resume, e.g. ("optimizer",)
  ))
  c.update(overrides)
  return c


def sharding(**overrides: Any) -> config_dict.ConfigDict:
  """The mesh ``(data, fsdp, tensor)`` (-1 = the remaining devices) and its rules."""
  c = config_dict.ConfigDict(dict(
      mesh_shape=(-1, 1, 1),
      fsdp=True,              # rules: params' embed axis over "fsdp"
      tensor=True,            # rules: heads / mlp / vocab over "tensor"
      # CPU only: split the host into this many JAX devices (one per core); -1 = auto
      # (cores dividing the batch), 0 = JAX's default single CPU device.
      cpu_devices=0,
  ))
  c.update(overrides)
  return c


def distributed() -> config_dict.ConfigDict:
  return config_dict.ConfigDict(dict(
      initialize="auto",      # "auto" | "always" | "never"
      coordinator_address=config_dict.placeholder(str),
      num_processes=config_dict.placeholder(int),
      process_id=config_dict.placeholder(int),
  ))


def init() -> config_dict.ConfigDict:
  """``init.pretrained``: a Hugging Face checkpoint directory to start from (its model
  and tokenizer replace the config's; see ``jaxformer/pretrained/runs.py``)."""
  return config_dict.ConfigDict(dict(pretrained=config_dict.placeholder(str)))


def finish(c: config_dict.ConfigDict, **sharding_overrides: Any
           ) -> config_dict.ConfigDict:
  """Adds the sharding, distributed and init sections."""
  c.sharding = sharding(**sharding_overrides)
  c.distributed = distributed()
  c.init = init()
  return c
