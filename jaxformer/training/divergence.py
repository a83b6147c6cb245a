"""Stop a diverged run: too many skipped steps in a row, and no checkpoint of it.

``train_step`` skips an update whose loss or gradients are not finite (or a loss
spike), so a run whose parameters blew up keeps "training" on skipped steps to the end.
:class:`DivergenceGuard` keeps each step's ``skipped`` and ``loss`` device scalars
unread (no host sync and no extra dispatch per step: a per-step jitted counter ran
synchronously on the CPU and stalled the host for a whole step, see
``experiments/benchmarks/cpu_profile.md``); the loop reads them only where it syncs
anyway (log and checkpoint steps). After ``train.max_consecutive_skipped`` in a row it raises
:class:`TrainingDivergedError` naming the step, the last finite loss and what to try;
while the newest step was skipped, no checkpoint is written, so the last good one is
never replaced by a diverged state.
"""

from __future__ import annotations

from typing import Any

import collections

import jax
import numpy as np

DEFAULT_MAX_CONSECUTIVE_SKIPPED = 20
# Unread steps kept before the oldest half is read (those are long finished, so reading
# them does not wait for the device): bounds memory when log_every is large.
_MAX_PENDING = 1024


class TrainingDivergedError(RuntimeError):
  """The run skipped ``train.max_consecutive_skipped`` steps in a row."""


def check_limit(m: Any) -> int | None:
  """``train.max_consecutive_skipped`` checked: an int >= 1, or None (never stop)."""
  if m is not None and (isinstance(m, bool) or not isinstance(m, int) or m < 1):
    raise ValueError(f"train.max_consecutive_skipped={m!r} must be an int >= 1 or "
                     "None (never stop)")
  return m


class DivergenceGuard:
  """Consecutive skipped steps, read from the device only when asked.

  Args:
    max_consecutive_skipped: ``train.max_consecutive_skipped``; None disables the stop
      (checkpoints of skipped steps are still withheld).
  """

  def __init__(self, max_consecutive_skipped: int | None):
    self.max_consecutive_skipped = check_limit(max_consecutive_skipped)
    self._pending: collections.deque[tuple[int, Any, Any]] = collections.deque()
    self._run = 0                  # consecutive skipped steps up to the last one read
    self._last_loss = float("nan")
    self._last_loss_step = 0
    self._withheld = False

  def update(self, step: int, metrics: dict[str, Any]) -> None:
    """Records step ``step``'s ``skipped`` and ``loss`` (device values, not read)."""
    self._pending.append((step, metrics["skipped"], metrics["loss"]))
    if len(self._pending) > _MAX_PENDING:
      self._consume(self._pending[len(self._pending) // 2][0])

  def _consume(self, upto: int) -> None:
    items = []
    while self._pending and self._pending[0][0] <= upto:
      items.append(self._pending.popleft())
    if not items:
      return
    # One transfer for all of them (each is a replicated scalar: shard 0 is enough).
    values = jax.device_get([
        tuple(x.addressable_data(0) if hasattr(x, "addressable_data") else x
              for x in (skipped, loss)) for _, skipped, loss in items])
    for (step, _, _), (skipped, loss) in zip(items, values):
      self._run = self._run + 1 if float(skipped) > 0 else 0
      if np.isfinite(loss):
        self._last_loss, self._last_loss_step = float(loss), step

  def read(self, step: int) -> int:
    """The consecutive skipped steps up to ``step`` (waits for it; steps dispatched
    after it stay unread)."""
    self._consume(step)
    return self._run

  def may_save(self, step: int, log: Any = None) -> bool:
    """Whether a checkpoint of the state after ``step`` may be written: the newest
    step was not skipped (waits for the device; raises like :meth:`check`). ``log``
    (``str -> None``) hears about a withheld checkpoint."""
    run = self.read(step)
    self.check(step, run)
    if run and log is not None and not self._withheld:
      log(f"not saving a checkpoint at step {step}: the last {run} step(s) were "
          "skipped (the last good checkpoint is kept)")
    self._withheld = run > 0
    return run == 0

  def check(self, step: int, consecutive_skipped: float) -> None:
    """Raises :class:`TrainingDivergedError` if ``consecutive_skipped`` (at ``step``)
    reached ``max_consecutive_skipped``."""
    m = self.max_consecutive_skipped
    run = int(consecutive_skipped)
    if m is None or run < m:
      return
    loss, at = self._last_loss, self._last_loss_step
    last = (f"the last finite loss was {loss:.4g} at step {at}" if np.isfinite(loss)
            else "no finite loss was seen in this run")
    raise TrainingDivergedError(
        f"training diverged: the last {run} steps up to step {step} were all skipped "
        f"(non-finite loss or gradients, train.max_consecutive_skipped={m}); {last}. "
        "The newest checkpoint is the last one before the divergence. Try a lower "
        "optimizer.learning_rate or a longer optimizer.warmup_steps, resuming with "
        "--config.train.allow_config_changes='(\"optimizer\",)', or a new --workdir.")
