"""The run's config, parsed once: one typed section each, errors naming the field.

:func:`parse` is the config's edge. It turns an experiment config (an
``ml_collections.ConfigDict`` or a dict, see ``experiments/configs/``) into a
:class:`RunConfig` of frozen sections, each owned where it is used:

=================  ==================================================================
``task_options``   the task's ``Options`` (:mod:`jaxformer.tasks`)
``data``           the task's ``Data`` (:class:`jaxformer.data.config.DataConfig` and
                   the fields only that task reads; ``source_options`` checked by the
                   source)
``model``          the model section as a plain dict, configured by the origin (the
                   model config is built once the tokenizer is known)
``optimizer``      :class:`~jaxformer.training.optimizer.OptimizerConfig`
``train``          :class:`TrainConfig`
``sharding``       :class:`~jaxformer.training.sharding.ShardingConfig`
``distributed``    :class:`~jaxformer.training.distributed.DistributedConfig`
``init``           :class:`~jaxformer.training.init.InitConfig` (``init`` and
                   ``finetune``), and :attr:`RunConfig.origin`, the origin it chooses
=================  ==================================================================

Every check that needs no device runs here, before anything is built or written (no
workdir is created for a config that fails it). After the edge, library code reads
attributes, never ``.get`` on a section.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any

from jaxformer import configs
from jaxformer import tasks
from jaxformer.data.config import DataConfig
from jaxformer.models import registry
from jaxformer.pretrained import runs as pretrained_runs
from jaxformer.training import distributed as distributed_lib
from jaxformer.training import divergence
from jaxformer.training import finetune
from jaxformer.training import init as init_lib
from jaxformer.training import optimizer as opt_lib
from jaxformer.training import resume_check
from jaxformer.training.sharding import ShardingConfig

SECTIONS = ("model", "data", "optimizer", "train", "sharding")


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
  """The ``train`` section: the loop's length, cadences, checkpoints and logging.

  Attributes:
    num_steps: train steps (micro-steps) in the whole run.
    seed: parameters, dropout and the data order.
    log_every, eval_every, checkpoint_every: cadences in steps (and at the end).
    eval_batches: held-out batches per evaluation.
    keep_checkpoints: checkpoints kept on disk.
    async_checkpoint: save in the background.
    progress: a progress bar (None: iff stdout is a TTY).
    tensorboard: write TensorBoard events.
    max_consecutive_skipped: stop a diverged run after this many skipped steps in a
      row (None: never).
    allow_config_changes: dotted keys that may change on resume, e.g.
      ``("optimizer.learning_rate",)``.
  """

  num_steps: int = 10_000
  seed: int = 0
  log_every: int = 100
  eval_every: int = 1000
  eval_batches: int = 20
  checkpoint_every: int = 1000
  keep_checkpoints: int = 2
  async_checkpoint: bool = True
  progress: bool | None = None
  tensorboard: bool = True
  max_consecutive_skipped: int | None = divergence.DEFAULT_MAX_CONSECUTIVE_SKIPPED
  allow_config_changes: tuple[str, ...] = ()

  def __post_init__(self):
    configs.check_positive(self, "train", "num_steps", "log_every", "eval_every",
                           "eval_batches", "checkpoint_every", "keep_checkpoints")
    if self.seed < 0:
      raise ValueError(f"train.seed={self.seed!r} must be an int >= 0")
    divergence.check_limit(self.max_consecutive_skipped)
    resume_check.check_allowed(self.allow_config_changes)


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunConfig:
  """A whole experiment config, parsed (see the module docstring).

  Attributes:
    task: the task's class (``config.task`` names it).
    task_options, data, model, optimizer, train, sharding, distributed, init: the
      sections.
    origin: where the parameters start (chosen by ``init``).
    stored: the config as JSON data, with the model section the origin configured:
      what checkpoints store and resumes compare.
  """

  task: type[tasks.Task]
  task_options: Any
  data: DataConfig
  model: dict[str, Any]
  optimizer: opt_lib.OptimizerConfig
  train: TrainConfig
  sharding: ShardingConfig
  distributed: distributed_lib.DistributedConfig
  init: init_lib.InitConfig
  origin: init_lib.Origin
  stored: dict[str, Any]

  def build_task(self, *, tokenizer: Any, model_config: Any) -> tasks.Task:
    return self.task(self.data, self.task_options, tokenizer=tokenizer,
                     model_config=model_config)


def make_origin(config: init_lib.InitConfig) -> init_lib.Origin:
  """The origin ``config`` chooses: scratch, a Hugging Face directory or our run."""
  if config.origin == "huggingface":
    return pretrained_runs.HuggingFaceOrigin(config)
  if config.origin == "run":
    return finetune.RunOrigin(config)
  return init_lib.Origin(config)


def _json(config: Any) -> dict[str, Any]:
  if hasattr(config, "to_json_best_effort"):
    return json.loads(config.to_json_best_effort())
  return json.loads(json.dumps(config, default=str))


def _section(config: Any, name: str) -> Any:
  return config[name] if name in config else None


def _check_model(model: Mapping[str, Any], data: DataConfig) -> None:
  """The model section's fields (errors name ``model.<field>``). An unset
  ``model.vocab_size`` is the tokenizer's, known once it is built (or fitted): here it
  takes the model's default."""
  fields = dict(model)
  if "vocab_size" in fields and fields["vocab_size"] is None and data.tokenizer:
    del fields["vocab_size"]
  registry.config_from_dict(fields["name"] if "name" in fields else None, fields)
  max_len = fields["max_len"] if "max_len" in fields else None
  if max_len is not None and (data.seq_len or 0) > max_len:
    raise ValueError(f"data.seq_len={data.seq_len} exceeds model.max_len={max_len}")


def parse(config: Any) -> RunConfig:
  """The experiment config ``config`` as a :class:`RunConfig` (the module docstring).

  Raises:
    ValueError: a missing section, an unknown task, field or option, or a bad value,
      naming its full path (``train.log_every``, ``data.source_options.path``, ...).
  """
  if isinstance(config, RunConfig):
    return config
  for name in SECTIONS:
    if name not in config:
      raise ValueError(f"config has no {name!r} section; it has "
                       f"{sorted(config.keys())}")
  if "task" not in config:
    raise ValueError(f"config has no 'task'; known tasks: {sorted(tasks.TASKS)}")
  task = tasks.task_class(config["task"])
  options = task.parse_options(_section(config, "task_options"))
  data = task.parse_data(config["data"])
  init = init_lib.InitConfig.parse(_section(config, "init"),
                                   _section(config, "finetune"))
  origin = make_origin(init)
  model = origin.configure(configs.plain(config["model"]))
  _check_model(model, data)
  stored = _json(config)
  stored["model"] = _json(model)
  return RunConfig(
      task=task, task_options=options, data=data, model=model,
      optimizer=opt_lib.OptimizerConfig.from_mapping(config["optimizer"]),
      train=configs.parse(TrainConfig, config["train"], "train"),
      sharding=ShardingConfig.parse(config["sharding"]),
      distributed=distributed_lib.DistributedConfig.parse(
          _section(config, "distributed")),
      init=init, origin=origin, stored=stored)
