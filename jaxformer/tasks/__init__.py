"""Tasks: one module per task, each owning its data, model inputs, loss, evals, sample.

``config.task`` names one of :data:`TASKS`; ``config.task_options`` are its options.
To add a task, subclass :class:`~jaxformer.tasks.base.Task` in a new module and add it
here.
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
  task_class(config["task"]).check_options(config.get("task_options"))


def build_task(config: Mapping[str, Any], *, tokenizer: Any = None,
               model_config: Any = None) -> Task:
  """The run's task from ``config.task``, ``task_options`` and ``data``."""
  cls = task_class(config["task"])
  return cls(config["data"], config.get("task_options"), tokenizer=tokenizer,
             model_config=model_config)
