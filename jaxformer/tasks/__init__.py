"""Tasks: one module per task, each owning its data, model inputs, loss, evals, sample.

``config.task`` names one of :data:`TASKS`; ``config.task_options`` are its options
(the task's ``Options`` dataclass) and ``config.data`` its data (the task's ``Data``,
:class:`~jaxformer.data.config.DataConfig` plus the fields only it reads). To add a
task, subclass :class:`~jaxformer.tasks.base.Task` in a new module and add it here.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from jaxformer.tasks.base import Runtime
from jaxformer.tasks.base import Task
from jaxformer.tasks.causal_lm import CausalLM
from jaxformer.tasks.classification import Classification
from jaxformer.tasks.classification import ImageClassification
from jaxformer.tasks.image_lm import AxialLM
from jaxformer.tasks.image_lm import ImageLM
from jaxformer.tasks.masked_lm import MaskedLM
from jaxformer.tasks.seq2seq import Seq2Seq

TASKS: dict[str, type[Task]] = {cls.name: cls for cls in (
    CausalLM, MaskedLM, Seq2Seq, Classification, ImageClassification, ImageLM, AxialLM)}


def task_class(name: str) -> type[Task]:
  """The task registered as ``name`` (ValueError listing the known ones)."""
  try:
    return TASKS[name]
  except KeyError:
    raise ValueError(f"task={name!r} is not a known task; known: "
                     f"{sorted(TASKS)}") from None


def check_task(config: Mapping[str, Any]) -> None:
  """ValueError unless ``config.task`` and ``config.task_options`` are valid."""
  task_class(config["task"]).parse_options(_options(config))


def build_task(config: Mapping[str, Any], *, tokenizer: Any = None,
               model_config: Any = None) -> Task:
  """The run's task from ``config.task``, ``task_options`` and ``data`` (an experiment
  config, or the parsed :class:`jaxformer.training.config.RunConfig`)."""
  cls = task_class(config["task"])
  return cls(config["data"], _options(config), tokenizer=tokenizer,
             model_config=model_config)


def _options(config: Mapping[str, Any]) -> Any:
  return config["task_options"] if "task_options" in config else None
