"""Sections shared by the experiment configs (optimizer, train, sharding, distributed).

Each config file states its model and data in full and takes these sections with the
overrides it needs (``train(num_steps=300, log_every=25)``); the fields are those of
``experiments/configs/gpt_bytes.py``, documented there.
"""

from __future__ import annotations

from typing import Any

from ml_collections import config_dict

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
      spike_factor=config_dict.placeholder(float),
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
      progress=config_dict.placeholder(bool),
      tensorboard=True,
      sample_tokens=0,
  ))
  c.update(overrides)
  return c


def sharding() -> config_dict.ConfigDict:
  return config_dict.ConfigDict(dict(mesh_shape=(-1, 1, 1), fsdp=True, tensor=True))


def distributed() -> config_dict.ConfigDict:
  return config_dict.ConfigDict(dict(
      initialize="auto",
      coordinator_address=config_dict.placeholder(str),
      num_processes=config_dict.placeholder(int),
      process_id=config_dict.placeholder(int),
  ))


def init() -> config_dict.ConfigDict:
  """``init.pretrained``: a Hugging Face checkpoint directory to start from (its model
  and tokenizer replace the config's; see ``jaxformer/pretrained/runs.py``)."""
  return config_dict.ConfigDict(dict(pretrained=config_dict.placeholder(str)))


def finish(c: config_dict.ConfigDict) -> config_dict.ConfigDict:
  """Adds the sharding, distributed and init sections."""
  c.sharding = sharding()
  c.distributed = distributed()
  c.init = init()
  return c
