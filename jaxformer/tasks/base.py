"""What a task is: its data, how a batch becomes model inputs, its loss, evals, sample.

A task is built once per run from the config (:func:`jaxformer.tasks.build_task`) and
owns everything that depends on what is being learned, including its typed sections
``Options`` (``config.task_options``) and ``Data`` (``config.data``); the training
loop only calls these methods and never names a task:

* ``batches(batch_size=, seed=, train=)``: this process's iterator of host batches
  (``train=True``: the train split, shuffled, endless; ``False``: the eval split in
  a fixed order, repeating), with ``get_state``/``set_state``;
* ``model_inputs(batch)``: the model's positional inputs, so that
  ``model.init(rng, *task.model_inputs(batch))`` initialises it;
* ``loss(model, params, batch, rng, deterministic) -> (loss, metrics)``, also the
  task's ``__call__`` (the ``TaskFn`` of :mod:`jaxformer.training.steps`);
  ``metrics["num_tokens"]`` weighs the other metrics so eval averages are exact;
* ``eval_metrics(params, batches, metrics, runtime)``: metrics beyond the loss's (bits
  per byte, BLEU, ...), from the eval batches just scored;
* ``sample(params, runtime, seed)``: an optional text sample at the end of a run (its
  settings are the task's options);
* ``example_length()``: tokens per example (for tokens/s and FLOPs).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar

import flax.linen as nn
import jax

from jaxformer import configs
from jaxformer.data import pipeline as pipeline_lib
from jaxformer.data.config import DataConfig

Batch = dict[str, Any]
Metrics = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class Runtime:
  """What a task's evals and samples need from the run (given by the loop).

  Attributes:
    model: the module being trained.
    sharding: the run's mesh and rules, a
      :class:`jaxformer.training.sharding.Sharding`.
  """
  model: nn.Module
  sharding: Any

  def shard(self, batch: Batch) -> Batch:
    """Host batch (this process's rows) -> global device arrays on the mesh."""
    return self.sharding.shard_batch(batch)

  def to_host(self, tree: Any) -> Any:
    """Global device values -> numpy on every process."""
    return self.sharding.to_host(tree)

  def activate(self) -> contextlib.AbstractContextManager[None]:
    """A context with the mesh and logical-axis rules active (for tracing)."""
    return self.sharding.activate()


def rngs(rng: jax.Array | None, deterministic: bool) -> dict[str, jax.Array]:
  """The ``rngs`` of ``model.apply``: dropout only in training."""
  return {"dropout": rng} if rng is not None and not deterministic else {}


@dataclasses.dataclass(frozen=True, kw_only=True)
class NoOptions:
  """A task without options (``config.task_options`` empty)."""


class Task:
  """The base of every task (see the module docstring).

  A task owns two typed sections: :attr:`Options` (``config.task_options``) and
  :attr:`Data` (``config.data``: :class:`~jaxformer.data.config.DataConfig` plus the
  fields only this task reads).

  Args:
    data: ``config.data`` (a ``Data`` or a mapping, parsed here); None for a task
      used only for its loss.
    options: ``config.task_options`` (an ``Options`` or a mapping).
    tokenizer: the run's tokenizer (None for image data).
    model_config: the model's config dataclass.
  """

  name: ClassVar[str] = "task"
  Options: ClassVar[type] = NoOptions
  Data: ClassVar[type[DataConfig]] = DataConfig

  def __init__(self, data: Any = None, options: Any = None, *, tokenizer: Any = None,
               model_config: Any = None):
    self.data = self.parse_data(data) if data else None
    self.options = self.parse_options(options)
    self.tokenizer = tokenizer
    self.model_config = model_config

  @classmethod
  def parse_options(cls, options: Any) -> Any:
    """``config.task_options`` as :attr:`Options` (ValueError naming the field)."""
    try:
      return configs.parse(cls.Options, options, "task_options")
    except ValueError as e:
      raise ValueError(f"{e} (options of task={cls.name!r})") from None

  @classmethod
  def parse_data(cls, data: Any) -> DataConfig:
    """``config.data`` as :attr:`Data` (ValueError naming ``data.<field>``)."""
    return configs.parse(cls.Data, data, "data")

  # --- data ---------------------------------------------------------------------------

  def source(self, train: bool) -> Any:
    """The train or eval split of ``data.source`` (``data.source_options``)."""
    return self.data.read_source(train)

  def describe_data(self) -> str:
    """The run's data for its header line (:meth:`DataConfig.describe`)."""
    return "data: none" if self.data is None else self.data.describe()

  def read_options(self, *, batch_size: int, seed: int,
                   train: bool) -> pipeline_lib.ReadOptions:
    """How this process reads its shard: train shuffled with prefetch, eval in order."""
    return pipeline_lib.ReadOptions(
        batch_size=batch_size, seed=seed, shard_index=jax.process_index(),
        shard_count=jax.process_count(), num_epochs=None, shuffle=train,
        prefetch=self.data.prefetch if train else 0)

  def batches(self, *, batch_size: int, seed: int, train: bool) -> Any:
    raise NotImplementedError(f"task {self.name!r} has no data pipeline")

  def example_length(self) -> int:
    return self.data.seq_len

  # --- model and loss -----------------------------------------------------------------

  def model_inputs(self, batch: Batch) -> tuple[Any, ...]:
    raise NotImplementedError(f"task {self.name!r} does not say its model inputs")

  def loss(self, model: nn.Module, params: Any, batch: Batch, rng: jax.Array | None,
           deterministic: bool) -> tuple[jax.Array, Metrics]:
    raise NotImplementedError(f"task {self.name!r} has no loss")

  def __call__(self, model: nn.Module, params: Any, batch: Batch,
               rng: jax.Array | None, deterministic: bool
               ) -> tuple[jax.Array, Metrics]:
    return self.loss(model, params, batch, rng, deterministic)

  def apply(self, model: nn.Module, params: Any, batch: Batch, rng: jax.Array | None,
            deterministic: bool) -> Any:
    """``model.apply`` on the task's model inputs of ``batch``."""
    return model.apply({"params": params}, *self.model_inputs(batch),
                       deterministic=deterministic, rngs=rngs(rng, deterministic))

  # --- evals and samples --------------------------------------------------------------

  def eval_metrics(self, params: Any, batches: list[Batch], metrics: Mapping[str, float],
                   runtime: Runtime) -> dict[str, float]:
    """Metrics beyond the loss's, from the host eval batches just scored."""
    del params, batches, metrics, runtime
    return {}

  def sample(self, params: Any, runtime: Runtime, seed: int) -> tuple[str, str] | None:
    """A sample of the trained model and a line describing how it was drawn (None:
    the task has none)."""
    del params, runtime, seed
    return None
