"""What a task is: its data, how a batch becomes model inputs, its loss, evals, sample.

A task is built once per run from the config (:func:`jaxformer.tasks.build_task`) and
owns everything that depends on what is being learned; the training loop only calls
these methods and never names a task:

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
* ``sample(params, runtime, train)``: an optional text sample at the end of a run;
* ``example_length()``: tokens per example (for tokens/s and FLOPs).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import flax.linen as nn
import jax

from jaxformer.data import sources

Batch = dict[str, Any]
Metrics = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class Runtime:
  """What a task's evals and samples need from the run (given by the loop).

  Attributes:
    model: the module being trained.
    shard: host batch (this process's rows) -> global device arrays on the mesh.
    to_host: global device values -> numpy on every process.
    activate: a context with the mesh and logical-axis rules active (for tracing).
  """
  model: nn.Module
  shard: Callable[[Batch], Batch]
  to_host: Callable[[Any], Any]
  activate: Callable[[], contextlib.AbstractContextManager[None]]


def rngs(rng: jax.Array | None, deterministic: bool) -> dict[str, jax.Array]:
  """The ``rngs`` of ``model.apply``: dropout only in training."""
  return {"dropout": rng} if rng is not None and not deterministic else {}


class Task:
  """The base of every task (see the module docstring).

  Args:
    data: ``config.data``.
    options: ``config.task_options``; keys must be in :attr:`OPTIONS`.
    tokenizer: the run's tokenizer (None for image data).
    model_config: the model's config dataclass.
  """

  name: ClassVar[str] = "task"
  # option name -> default; ``config.task_options`` may set these and nothing else.
  OPTIONS: ClassVar[dict[str, Any]] = {}

  def __init__(self, data: Mapping[str, Any], options: Mapping[str, Any] | None = None,
               *, tokenizer: Any = None, model_config: Any = None):
    self.data = data
    self.options = {**self.OPTIONS, **self.check_options(options)}
    self.tokenizer = tokenizer
    self.model_config = model_config

  @classmethod
  def check_options(cls, options: Mapping[str, Any] | None) -> dict[str, Any]:
    """``options`` as a dict; ValueError naming any the task does not take."""
    options = dict(options or {})
    unknown = sorted(set(options) - set(cls.OPTIONS))
    if unknown:
      raise ValueError(f"task_options {unknown} are not options of task="
                       f"{cls.name!r}; valid: {sorted(cls.OPTIONS)}")
    return options

  # --- data ---------------------------------------------------------------------------

  def source(self, train: bool) -> Any:
    """The train or eval split of ``data.source`` (``data.source_options``)."""
    split = (self.data.get("train_split", "train") if train
             else self.data.get("eval_split", "validation"))
    return sources.get_source(self.data["source"], split,
                              **dict(self.data.get("source_options") or {}))

  def describe_data(self) -> str:
    """What the run reads, for its header line: source, options and both splits.

    E.g. ``data 'imdb_reviews' (train split 'train', eval split 'test')``.
    """
    options = dict(self.data.get("source_options") or {})
    shown = {k: v for k, v in options.items() if v is not None}
    return (f"data {self.data['source']!r}" + (f" {shown}" if shown else "")
            + f" (train split {self.data.get('train_split', 'train')!r}, eval split "
            f"{self.data.get('eval_split', 'validation')!r})")

  def example_kwargs(self, *, batch_size: int, seed: int,
                     train: bool) -> dict[str, Any]:
    """The pipelines' common arguments for this process's shard."""
    return dict(batch_size=batch_size, seed=seed, shard_index=jax.process_index(),
                shard_count=jax.process_count(), num_epochs=None, shuffle=train,
                prefetch=self.data.get("prefetch", 0) if train else 0)

  def batches(self, *, batch_size: int, seed: int, train: bool) -> Any:
    raise NotImplementedError(f"task {self.name!r} has no data pipeline")

  def example_length(self) -> int:
    return self.data["seq_len"]

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

  def sample(self, params: Any, runtime: Runtime,
             train: Mapping[str, Any]) -> str | None:
    """A sample of the trained model (None: the task has none)."""
    del params, runtime, train
    return None
