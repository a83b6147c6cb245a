"""AdamW with warmup + decay schedules, masked weight decay, clipping and accumulation.

One frozen :class:`OptimizerConfig` describes the optimizer; :func:`make_optimizer`
turns it into an ``optax.GradientTransformation``::

  tx = make_optimizer(OptimizerConfig(learning_rate=1e-3, warmup_steps=100),
                      total_steps=2000)

The chain is ``clip_by_global_norm -> adamw(lr schedule, decay mask)``, wrapped in
``optax.MultiSteps`` when ``grad_accum_steps > 1``. Mixed precision is the model's
business (``dtype`` = compute dtype, ``param_dtype`` = float32 master weights); the
optimizer always sees float32 parameters and gradients. Skipping non-finite or spiking
updates happens in :mod:`jaxformer.training.steps`, which sees the loss.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp
import optax
from flax import traverse_util

SCHEDULES = ("cosine", "linear", "rsqrt", "constant")

# Parameter paths (``"/"``-joined Flax names) excluded from weight decay by default:
# biases, norm scales/biases, and embedding tables.
DEFAULT_NO_DECAY = (
    r"(^|/)bias$",
    r"(^|/)scale$",
    r"(^|/)[^/]*(norm|ln)[^/]*/",
    r"(^|/)embedding$",
)


@dataclasses.dataclass(frozen=True, kw_only=True)
class OptimizerConfig:
  """Everything :func:`make_optimizer` needs.

  Attributes:
    learning_rate: peak learning rate (reached at the end of warmup).
    schedule: decay after warmup, one of ``SCHEDULES``.
    warmup_steps: linear warmup from 0 over this many optimizer updates.
    end_lr_fraction: final lr = ``end_lr_fraction * learning_rate`` (cosine, linear).
    b1, b2, eps: Adam moments.
    weight_decay: decoupled weight decay coefficient.
    no_decay: regexes over ``"/"``-joined parameter paths; a match turns decay off.
    grad_clip_norm: clip gradients to this global norm (``None`` or 0 = no clipping).
    grad_accum_steps: micro-batches per optimizer update (``optax.MultiSteps``).
    spike_factor: a step whose loss exceeds ``spike_factor`` x the running mean loss is
      skipped (``None`` = only non-finite steps are skipped).
    spike_warmup_steps: no spike check during the first steps (running mean settling).
    max_consecutive_spikes: after this many consecutive spike skips the update is
      applied anyway (the loss level really changed). Non-finite updates are never
      applied.
    loss_ema_decay: decay of the running mean used by the spike check.
  """

  learning_rate: float = 1e-3
  schedule: str = "cosine"
  warmup_steps: int = 0
  end_lr_fraction: float = 0.1
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  weight_decay: float = 0.1
  no_decay: Sequence[str] = DEFAULT_NO_DECAY
  grad_clip_norm: float | None = 1.0
  grad_accum_steps: int = 1
  spike_factor: float | None = None
  spike_warmup_steps: int = 100
  max_consecutive_spikes: int = 10
  loss_ema_decay: float = 0.99

  def __post_init__(self):
    if self.schedule not in SCHEDULES:
      raise ValueError(
          f"optimizer.schedule={self.schedule!r} is not one of {SCHEDULES}")
    if not self.learning_rate > 0:
      raise ValueError(
          f"optimizer.learning_rate={self.learning_rate!r} must be > 0")
    if self.warmup_steps < 0:
      raise ValueError(
          f"optimizer.warmup_steps={self.warmup_steps!r} must be >= 0")
    if not 0.0 <= self.end_lr_fraction <= 1.0:
      raise ValueError(f"optimizer.end_lr_fraction={self.end_lr_fraction!r} "
                       "must be in [0, 1]")
    if self.grad_accum_steps < 1:
      raise ValueError(
          f"optimizer.grad_accum_steps={self.grad_accum_steps!r} must be >= 1")
    if self.spike_factor is not None and not self.spike_factor > 1.0:
      raise ValueError(f"optimizer.spike_factor={self.spike_factor!r} must be "
                       "> 1 or None (no spike check)")
    if not 0.0 < self.loss_ema_decay < 1.0:
      raise ValueError(
          f"optimizer.loss_ema_decay={self.loss_ema_decay!r} must be in (0, 1)")
    for pattern in self.no_decay:
      try:
        re.compile(pattern)
      except re.error as e:
        raise ValueError(
            f"optimizer.no_decay entry {pattern!r} is not a regex: {e}") from e

  @classmethod
  def from_mapping(cls, mapping: Any) -> OptimizerConfig:
    """Builds from a dict / ``ConfigDict``; unknown keys raise a ValueError."""
    values = dict(mapping)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - fields)
    if unknown:
      raise ValueError(f"unknown optimizer config fields {unknown}; "
                       f"valid: {sorted(fields)}")
    if "no_decay" in values:
      values["no_decay"] = tuple(values["no_decay"])
    return cls(**values)


def make_schedule(config: OptimizerConfig, total_steps: int) -> optax.Schedule:
  """Learning rate as a function of the optimizer update count.

  Linear warmup ``0 -> learning_rate`` over ``warmup_steps``, then:
  ``cosine`` / ``linear`` decay to ``end_lr_fraction * learning_rate`` at
  ``total_steps``; ``rsqrt``: ``lr * sqrt(warmup / step)``; ``constant``.

  Args:
    config: the optimizer config.
    total_steps: optimizer updates in the whole run (micro-steps / grad_accum_steps).
  Returns:
    An ``optax.Schedule``.
  """
  if total_steps < 1:
    raise ValueError(f"total_steps={total_steps!r} must be >= 1")
  peak = config.learning_rate
  warmup = min(config.warmup_steps, total_steps)
  end = peak * config.end_lr_fraction
  decay_steps = max(total_steps - warmup, 1)
  if config.schedule == "cosine":
    decay = optax.cosine_decay_schedule(
        peak, decay_steps, alpha=config.end_lr_fraction)
  elif config.schedule == "linear":
    decay = optax.linear_schedule(peak, end, decay_steps)
  elif config.schedule == "rsqrt":
    offset = max(warmup, 1)

    def decay(count):
      count = jnp.maximum(jnp.asarray(count, jnp.float32), 0.0)
      return peak * jnp.sqrt(offset / (count + offset))
  else:  # constant
    decay = optax.constant_schedule(peak)
  if warmup == 0:
    return decay
  return optax.join_schedules(
      [optax.linear_schedule(0.0, peak, warmup), decay], [warmup])


def decay_mask(params: Any, no_decay: Sequence[str] = DEFAULT_NO_DECAY) -> Any:
  """A pytree of bools like ``params``: True where weight decay applies.

  Args:
    params: a (nested dict) parameter tree.
    no_decay: regexes over ``"/"``-joined paths; any match -> no decay.
  """
  patterns = [re.compile(p) for p in no_decay]
  flat = traverse_util.flatten_dict(params, sep="/")
  mask = {path: not any(p.search(path) for p in patterns) for path in flat}
  return traverse_util.unflatten_dict(mask, sep="/")


def make_optimizer(config: OptimizerConfig,
                   total_steps: int) -> optax.GradientTransformation:
  """The optax optimizer described by ``config``.

  Args:
    config: the optimizer config.
    total_steps: ``train_step`` calls in the run; with ``grad_accum_steps = k`` the
      schedule spans ``total_steps // k`` optimizer updates.
  Returns:
    An ``optax.GradientTransformation`` (``optax.MultiSteps``-wrapped if k > 1).
  """
  k = config.grad_accum_steps
  schedule = make_schedule(config, max(total_steps // k, 1))
  parts = []
  if config.grad_clip_norm:
    parts.append(optax.clip_by_global_norm(config.grad_clip_norm))
  parts.append(
      optax.adamw(
          schedule,
          b1=config.b1,
          b2=config.b2,
          eps=config.eps,
          weight_decay=config.weight_decay,
          mask=lambda p: decay_mask(p, config.no_decay),
      ))
  tx = optax.chain(*parts)
  if k > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=k).gradient_transformation()
  return tx
