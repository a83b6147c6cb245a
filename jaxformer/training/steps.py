"""Pure, jitted train and eval steps.

``train_step(state, batch) -> (state, metrics)`` and ``eval_step(params, batch) ->
metrics`` are built by :func:`make_train_step` / :func:`make_eval_step` from a model, a
*task* (the loss, see :mod:`jaxformer.tasks`) and an optimizer. They are
jitted with explicit in/out shardings, the state is donated, and nothing in them talks
to the host: metrics stay on device until the loop asks for them.

Skipping: an update is not applied (params and optimizer state keep their values) if
the loss, the gradients or the updates are not finite, or - when
``spike_factor`` is set - if the loss exceeds ``spike_factor`` x the running mean of
accepted losses (after ``spike_warmup_steps``; after ``max_consecutive_spikes`` such
skips in a row the update is applied anyway). Every skip is counted in
``state.skipped_steps``. ``state.step`` always advances (the batch was consumed).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from jaxformer.training.optimizer import OptimizerConfig
from jaxformer.training.sharding import Sharding
from jaxformer.training.state import TrainState

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]


class TaskFn(Protocol):
  """``(model, params, batch, rng, deterministic) -> (loss, metrics)``.

  ``loss`` is a float32 scalar (mean over counted targets); ``metrics`` a dict of
  float32 scalars that are means over ``metrics["num_tokens"]`` weights (plus
  ``num_tokens`` itself), so that eval can average them over batches exactly.
  """

  def __call__(self, model: nn.Module, params: Any, batch: Batch,
               rng: jax.Array | None, deterministic: bool
               ) -> tuple[jax.Array, Metrics]:
    ...


def _select(pred: jax.Array, on_true: Any, on_false: Any) -> Any:
  return jax.tree.map(lambda a, b: jnp.where(pred, a, b), on_true, on_false)


def train_step(state: TrainState, batch: Batch, *, model: nn.Module,
               task: TaskFn, tx: optax.GradientTransformation,
               opt_config: OptimizerConfig,
               schedule: optax.Schedule | None = None) -> tuple[TrainState, Metrics]:
  """One optimizer micro-step (un-jitted; see :func:`make_train_step`).

  Args:
    state: the train state.
    batch: arrays with leading batch axis (``inputs``, ``targets``, ``weights``, ...).
    model: the Flax module.
    task: the loss function.
    tx: the optimizer.
    opt_config: for the skip policy.
    schedule: learning-rate schedule for logging (``None`` -> not logged).
  Returns:
    ``(new_state, metrics)``; metrics are device scalars.
  """
  rng = state.step_key()

  def loss_fn(params):
    return task(model, params, batch, rng, False)

  (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  grad_norm = optax.tree.norm(grads)
  updates, new_opt_state = tx.update(grads, state.opt_state, state.params)
  new_params = optax.apply_updates(state.params, updates)

  finite = (jnp.isfinite(loss) & jnp.isfinite(grad_norm)
            & jnp.isfinite(optax.tree.norm(updates)))
  loss_f32 = loss.astype(jnp.float32)
  if opt_config.spike_factor is not None:
    spike = ((state.step >= opt_config.spike_warmup_steps)
             & (state.loss_ema > 0)
             & (loss_f32 > opt_config.spike_factor * state.loss_ema))
    spike_skip = spike & (state.spike_run < opt_config.max_consecutive_spikes)
  else:
    spike = spike_skip = jnp.zeros([], jnp.bool_)
  accept = finite & ~spike_skip

  decay = opt_config.loss_ema_decay
  ema = jnp.where(state.loss_ema > 0,
                  decay * state.loss_ema + (1.0 - decay) * loss_f32, loss_f32)
  new_state = state.replace(
      step=state.step + 1,
      params=_select(accept, new_params, state.params),
      opt_state=_select(accept, new_opt_state, state.opt_state),
      skipped_steps=state.skipped_steps + (~accept).astype(jnp.int32),
      loss_ema=jnp.where(accept, ema, state.loss_ema),
      spike_run=jnp.where(spike_skip, state.spike_run + 1, 0).astype(jnp.int32),
  )
  metrics = dict(metrics)
  metrics.update(
      loss=loss_f32,
      grad_norm=grad_norm,
      skipped=(~accept).astype(jnp.float32),
      skipped_steps=new_state.skipped_steps,
  )
  if schedule is not None:
    metrics["learning_rate"] = jnp.asarray(
        schedule(state.step // opt_config.grad_accum_steps), jnp.float32)
  return new_state, metrics


def eval_step(params: Any, batch: Batch, *, model: nn.Module,
              task: TaskFn) -> Metrics:
  """Token-weighted *sums* of the task metrics over one batch (un-jitted).

  Returns ``{name + "_sum": metric * num_tokens, "num_tokens": num_tokens}`` so that
  :func:`reduce_eval_metrics` can average over any number of batches exactly.
  """
  loss, metrics = task(model, params, batch, None, True)
  metrics = dict(metrics, loss=loss)
  n = jnp.asarray(metrics.pop("num_tokens", 1.0), jnp.float32)
  out = {f"{k}_sum": jnp.asarray(v, jnp.float32) * n for k, v in metrics.items()}
  out["num_tokens"] = n
  return out


def reduce_eval_metrics(per_batch: list[dict[str, Any]]) -> dict[str, float]:
  """Averages :func:`eval_step` outputs (host values) over batches."""
  if not per_batch:
    raise ValueError("reduce_eval_metrics needs at least one batch of metrics")
  totals = {k: sum(float(m[k]) for m in per_batch) for k in per_batch[0]}
  n = totals.pop("num_tokens")
  out = {k[:-len("_sum")]: v / max(n, 1e-9) for k, v in totals.items()}
  out["num_tokens"] = n
  return out


def _with_context(fn: Callable[..., Any], sharding: Sharding) -> Callable[..., Any]:
  """Calls (and therefore traces) ``fn`` with the mesh and logical rules active."""

  def wrapped(*args):
    with sharding.activate():
      return fn(*args)

  wrapped.jitted = fn  # for .lower(...) (cost analysis, benchmarks)
  return wrapped


def make_train_step(*, model: nn.Module, task: TaskFn,
                    tx: optax.GradientTransformation, opt_config: OptimizerConfig,
                    sharding: Sharding, shardings: TrainState,
                    schedule: optax.Schedule | None = None,
                    donate: bool = True) -> Callable[[TrainState, Batch],
                                                     tuple[TrainState, Metrics]]:
  """``train_step`` jitted with state/batch shardings and the state donated."""

  def step(state, batch):
    return train_step(state, batch, model=model, task=task, tx=tx,
                      opt_config=opt_config, schedule=schedule)

  jitted = jax.jit(
      step,
      in_shardings=(shardings, sharding.batch_sharding()),
      out_shardings=(shardings, sharding.replicated()),
      donate_argnums=(0,) if donate else (),
  )
  return _with_context(jitted, sharding)


def make_eval_step(*, model: nn.Module, task: TaskFn, sharding: Sharding,
                   param_shardings: Any) -> Callable[[Any, Batch], Metrics]:
  """``eval_step`` jitted with param/batch shardings (params not donated)."""

  def step(params, batch):
    return eval_step(params, batch, model=model, task=task)

  jitted = jax.jit(
      step,
      in_shardings=(param_shardings, sharding.batch_sharding()),
      out_shardings=sharding.replicated(),
  )
  return _with_context(jitted, sharding)
