"""The config's edge: every check that needs no device, with errors naming the field.

:func:`validate_config` runs once, before anything is built or written (no workdir is
created for a config that fails it).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from jaxformer import tasks
from jaxformer.data import local_text
from jaxformer.data import sources
from jaxformer.data import vocab
from jaxformer.models import registry
from jaxformer.pretrained import runs as pretrained_runs
from jaxformer.training import divergence
from jaxformer.training import optimizer as opt_lib
from jaxformer.training import resume_check

SECTIONS = ("model", "data", "optimizer", "train", "sharding")
TRAIN_COUNTS = ("num_steps", "log_every", "eval_every", "eval_batches",
                "checkpoint_every", "keep_checkpoints")
DATA_COUNTS = ("batch_size", "eval_batch_size", "seq_len", "source_len", "target_len")


def _is_int(value: Any) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def check_positive(section: Mapping[str, Any], names: tuple[str, ...], prefix: str,
                   *, required: bool = True) -> None:
  """ValueError ``prefix.name=value must be an int >= 1`` for the first bad field."""
  for name in names:
    if name not in section:
      if required:
        raise ValueError(f"{prefix}.{name} is missing")
      continue
    value = section[name]
    if not _is_int(value) or value < 1:
      raise ValueError(f"{prefix}.{name}={value!r} must be an int >= 1")


def _check_mesh_shape(shape: Any) -> None:
  try:
    entries = tuple(shape)
  except TypeError:
    entries = None
  if (entries is None or len(entries) != 3 or not all(_is_int(s) for s in entries)
      or entries.count(-1) > 1 or any(s == 0 or s < -1 for s in entries)):
    raise ValueError(f"sharding.mesh_shape={shape!r} must be 3 ints (data, fsdp, "
                     "tensor), positive, with at most one -1 (= the remaining "
                     "devices)")


def validate_config(config: Mapping[str, Any]) -> None:
  """Cheap checks of the whole config (ValueError naming the field)."""
  for section in SECTIONS:
    if section not in config:
      raise ValueError(f"config has no {section!r} section; it has "
                       f"{sorted(config.keys())}")
  if "task" not in config:
    raise ValueError(f"config has no 'task'; known tasks: {sorted(tasks.TASKS)}")
  tasks.check_task(config)
  train, data = config["train"], config["data"]
  check_positive(train, TRAIN_COUNTS, "train")
  check_positive(data, DATA_COUNTS[:2], "data")
  check_positive(data, DATA_COUNTS[2:], "data", required=False)
  if not _is_int(train.get("seed")) or train["seed"] < 0:
    raise ValueError(f"train.seed={train.get('seed')!r} must be an int >= 0")
  _check_mesh_shape(config["sharding"].get("mesh_shape"))
  if data.get("source") not in sources.SOURCES:
    raise ValueError(f"data.source={data.get('source')!r} is not a known source; "
                     f"known: {sorted(sources.SOURCES)}")
  kind = data.get("tokenizer")
  # init.pretrained brings the checkpoint's own tokenizer (jaxformer.pretrained.runs).
  pretrained = kind == pretrained_runs.TOKENIZER and pretrained_runs.directory(config)
  if kind is not None and kind not in vocab.TOKENIZERS and not pretrained:
    raise ValueError(f"data.tokenizer={kind!r} is not one of {vocab.TOKENIZERS}")
  model = dict(config["model"])
  if model.get("vocab_size", 0) is None and kind is not None:
    model["vocab_size"] = 8  # set from the fitted tokenizer at the start of the run
  registry.config_from_dict(model.get("name"), model)  # errors name model.<field>
  if data.get("source") == "text_files":  # splits big enough for a sequence each
    local_text.check_options(**dict(data.get("source_options") or {}),
                             min_validation_bytes=data.get("seq_len") or 1)
  max_len = config["model"].get("max_len")
  if max_len is not None and data.get("seq_len", 0) > max_len:
    raise ValueError(f"data.seq_len={data['seq_len']} exceeds "
                     f"model.max_len={max_len}")
  opt_lib.OptimizerConfig.from_mapping(config["optimizer"])
  divergence.check_limit(train.get("max_consecutive_skipped"))
  resume_check.allowed_changes(config)
