"""Tasks: the loss of one objective, ``(model, params, batch, rng, deterministic) ->
(loss, metrics)``, picked by name from :data:`TASKS` (``config.task``).

A task knows which batch features its model takes and which objective scores the
output; the train/eval steps know nothing else about the objective. To add one (masked
LM, seq2seq, classification, ...), write a function with this signature next to the
objective and add it to :data:`TASKS`.

A task may also register an *extra eval* in :data:`EXTRA_EVALS` (e.g. BLEU of decoded
translations for ``seq2seq``): metrics that need more than the teacher-forced eval step,
computed by the loop's evaluator on the same eval batches and logged beside them.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax

from jaxformer.objectives import causal_lm
from jaxformer.training import task_library
from jaxformer.training.steps import Batch, ExtraEval, Metrics, TaskFn


def causal_lm_task(model: nn.Module, params: Any, batch: Batch,
                   rng: jax.Array | None, deterministic: bool
                   ) -> tuple[jax.Array, Metrics]:
  """Next-token prediction on a packed LM batch.

  Args:
    model: a decoder-only LM, ``(inputs_BL, segment_ids=, positions=,
      deterministic=) -> logits_BLV``.
    params: its parameters.
    batch: ``inputs``/``targets``/``weights`` ``[B, L]`` and optionally
      ``segment_ids``/``positions`` ``[B, L]`` (packed documents).
    rng: dropout key (None when deterministic).
    deterministic: disables dropout.
  Returns:
    ``causal_lm.loss`` of the logits: ``(loss, metrics)``.
  """
  rngs = {"dropout": rng} if rng is not None and not deterministic else {}
  logits_BLV = model.apply(
      {"params": params}, batch["inputs"],
      segment_ids=batch.get("segment_ids"), positions=batch.get("positions"),
      deterministic=deterministic, rngs=rngs)
  return causal_lm.loss(logits_BLV, batch["targets"], batch.get("weights"))


TASKS: dict[str, TaskFn] = {
    "causal_lm": causal_lm_task,
    **task_library.TASKS,   # masked_lm, seq2seq, classification, image_lm, axial_lm
}


# task name -> factory ``(config, *, model, tokenizer, mesh, rules) -> ExtraEval | None``
# (None: nothing to add for this config). Tasks without an entry have no extra eval.
EXTRA_EVALS: dict[str, Callable[..., ExtraEval | None]] = {
    **task_library.EXTRA_EVALS,   # seq2seq: BLEU (train.bleu_batches)
}


def get_extra_eval(config: Mapping[str, Any], *, model: nn.Module, tokenizer: Any,
                   mesh: jax.sharding.Mesh, rules: Any) -> ExtraEval | None:
  """The extra eval of ``config.task`` for this run, or None.

  Returns:
    ``(params, batches) -> metrics``: ``batches`` are the host (process-local) eval
    batches the evaluator has just scored; metric names get the ``eval_`` prefix when
    logged. None when the task registers none or the config turns it off.
  """
  factory = EXTRA_EVALS.get(config["task"])
  if factory is None:
    return None
  return factory(config, model=model, tokenizer=tokenizer, mesh=mesh, rules=rules)


def get_task(name: str, options: Mapping[str, Any] | None = None, *,
             tokenizer: Any = None) -> TaskFn:
  """The task registered as ``name`` (ValueError listing the known ones).

  Args:
    name: a key of :data:`TASKS` (``config.task``).
    options: the task's keyword options (``config.task_options``); a ValueError
      names any the task does not take.
    tokenizer: passed as the ``tokenizer`` keyword to tasks that take one.
  Returns:
    The task with its options bound: a :class:`~jaxformer.training.steps.TaskFn`.
  """
  try:
    fn = TASKS[name]
  except KeyError:
    raise ValueError(
        f"task={name!r} is not a known task; known: {sorted(TASKS)}") from None
  options = dict(options or {})
  accepted = {p.name for p in inspect.signature(fn).parameters.values()
              if p.kind == inspect.Parameter.KEYWORD_ONLY}
  unknown = sorted(set(options) - (accepted - {"tokenizer"}))
  if unknown:
    raise ValueError(f"task_options {unknown} are not options of task={name!r}; "
                     f"valid: {sorted(accepted - {'tokenizer'})}")
  if "tokenizer" in accepted:
    options["tokenizer"] = tokenizer
  return functools.partial(fn, **options) if options else fn


class _InitRecorder:
  """Stands in for the model while a task runs once: ``apply`` initialises instead."""

  def __init__(self, model: nn.Module, rng: jax.Array):
    self._model, self._rng = model, rng
    self.variables: Any = None
    self.config = getattr(model, "config", None)

  def apply(self, variables, *args, rngs=None, **kwargs):
    del variables, rngs  # init draws params from self._rng; tasks init deterministic
    if self.variables is not None:
      raise ValueError("init_variables: the task calls model.apply more than once")
    out, self.variables = self._model.init_with_output(self._rng, *args, **kwargs)
    return out


def init_variables(model: nn.Module, task: TaskFn, batch: Batch,
                   rng: jax.Array) -> dict[str, Any]:
  """``model.init`` with exactly the inputs ``task`` gives the model for ``batch``.

  Runs the task once (deterministic) with ``model.apply`` replaced by
  ``model.init_with_output(rng, ...)``, so every task initialises its model without a
  separate description of the model's inputs. Only shapes of ``batch`` matter.
  """
  recorder = _InitRecorder(model, rng)
  task(recorder, None, batch, None, True)
  return recorder.variables
