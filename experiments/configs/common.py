"""The sections of the experiment configs, each written once, from its typed dataclass.

Every section is a ``ConfigDict`` with every field of the dataclass the library parses
it into (:func:`section`): the defaults live in the dataclass, the command line can set
any field (``--config.train.log_every=10``), and a config states only what differs
(``train(num_steps=300, log_every=25)``). The sections:

* ``model(preset, **overrides)``: a preset of :mod:`jaxformer.models.registry`;
* ``data(task, source=..., **fields)``: the task's ``Data`` (a TFDS source gets its
  ``data_dir`` option, unset);
* ``task_options(task, **options)``: the task's ``Options``;
* ``optimizer``, ``train``, ``sharding``, ``distributed``, ``init``, ``finetune``.

:func:`tiny` shrinks a config to its CPU variant in one call (switching the data
source resets the source's options).
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any

from ml_collections import config_dict

from jaxformer import tasks
from jaxformer.data import sources
from jaxformer.layers.blocks import BlockConfig
from jaxformer.models import registry
from jaxformer.training import config as run_config
from jaxformer.training import distributed as distributed_lib
from jaxformer.training import init as init_lib
from jaxformer.training import optimizer as opt_lib
from jaxformer.training import sharding as sharding_lib

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


def section(cls: type, **overrides: Any) -> config_dict.ConfigDict:
  """A section with every field of the dataclass ``cls`` at its default (an unset,
  None, field as a typed placeholder the command line can set), then ``overrides``
  (which must be fields of ``cls``; fields without a default must be among them)."""
  fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
  unknown = sorted(set(overrides) - set(fields))
  if unknown:
    raise ValueError(f"{cls.__name__} has no fields {unknown}; valid: {sorted(fields)}")
  hints = typing.get_type_hints(cls)
  values = {}
  for name, field in fields.items():
    if name in overrides:
      value = overrides[name]
    elif field.default is not dataclasses.MISSING:
      value = field.default
    elif field.default_factory is not dataclasses.MISSING:
      value = field.default_factory()
    else:
      raise ValueError(f"{cls.__name__}.{name} has no default: give it")
    if isinstance(value, dict):
      value = config_dict.ConfigDict(value)
    elif value is None:
      words = str(hints[name]).replace("|", " ").replace("[", " ").split()
      kind = next((t for n, t in _TYPES if n in words), object)
      value = config_dict.placeholder(kind)
    values[name] = value
  return config_dict.ConfigDict(values)


def _source_options(source: str) -> config_dict.ConfigDict:
  # A TFDS source reads a prepared data_dir (None: TFDS's default).
  if source in sources.TFDS_DATASETS:
    return config_dict.ConfigDict(dict(data_dir=config_dict.placeholder(str)))
  return config_dict.ConfigDict()


def data(task: str, *, source: str, **fields: Any) -> config_dict.ConfigDict:
  """The ``data`` section of ``task`` (its ``Data`` dataclass) reading ``source``."""
  fields.setdefault("source_options", _source_options(source))
  return section(tasks.task_class(task).Data, source=source, **fields)


def task_options(task: str, **options: Any) -> config_dict.ConfigDict:
  """The ``task_options`` section of ``task`` (its ``Options`` dataclass)."""
  return section(tasks.task_class(task).Options, **options)


def optimizer(**overrides: Any) -> config_dict.ConfigDict:
  """AdamW with warmup and a decay schedule (``OptimizerConfig``)."""
  return section(opt_lib.OptimizerConfig, **overrides)


def train(**overrides: Any) -> config_dict.ConfigDict:
  """Loop settings (``TrainConfig``)."""
  return section(run_config.TrainConfig, **overrides)


def sharding(**overrides: Any) -> config_dict.ConfigDict:
  """The mesh (-1 = the remaining devices) and its rules (``ShardingConfig``)."""
  return section(sharding_lib.ShardingConfig, **overrides)


def distributed() -> config_dict.ConfigDict:
  return section(distributed_lib.DistributedConfig)


def init() -> config_dict.ConfigDict:
  """``init.pretrained``: a Hugging Face checkpoint directory to start from (its model
  and tokenizer replace the config's; see ``jaxformer/training/init.py``)."""
  return section(init_lib.InitSection)


def finetune(**overrides: Any) -> config_dict.ConfigDict:
  """Starting from one of our runs (``jaxformer/training/init.py``)."""
  return section(init_lib.FinetuneSection, **overrides)


def finish(c: config_dict.ConfigDict, **sharding_overrides: Any
           ) -> config_dict.ConfigDict:
  """Adds the sharding, distributed and init sections."""
  c.sharding = sharding(**sharding_overrides)
  c.distributed = distributed()
  c.init = init()
  return c


def tiny(c: config_dict.ConfigDict, *, model: dict[str, Any] | None = None,
         block: dict[str, Any] | None = None, data: dict[str, Any] | None = None,
         task_options: dict[str, Any] | None = None,
         optimizer: dict[str, Any] | None = None,
         train: dict[str, Any] | None = None) -> config_dict.ConfigDict:
  """``c`` shrunk to its CPU variant: each section updated with its dict (a new
  ``data.source`` comes with that source's options)."""
  for name, values in (("model", model), ("data", data),
                       ("task_options", task_options), ("optimizer", optimizer),
                       ("train", train)):
    if values:
      c[name].update(values)
  if block:
    c.model.block.update(block)
  if data and "source" in data and "source_options" not in data:
    c.data.source_options = _source_options(data["source"])
  return c
