"""Stop a diverged run: too many skipped steps in a row, and no checkpoint of it.

``train_step`` skips an update whose loss or gradients are not finite (or a loss
spike), so a run whose parameters blew up keeps "training" on skipped steps to the end.
:class:`DivergenceGuard` counts consecutive skipped steps on the device (no host sync
per step); the loop reads the count only where it syncs anyway (log and checkpoint
steps). After ``train.max_consecutive_skipped`` in a row it raises
:class:`TrainingDivergedError` naming the step, the last finite loss and what to try;
while the newest step was skipped, no checkpoint is written, so the last good one is
never replaced by a diverged state.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

DEFAULT_MAX_CONSECUTIVE_SKIPPED = 20


class TrainingDivergedError(RuntimeError):
  """The run skipped ``train.max_consecutive_skipped`` steps in a row."""


@jax.jit
def _track(tracked: dict[str, jax.Array], skipped: jax.Array, loss: jax.Array,
           step: jax.Array) -> dict[str, jax.Array]:
  finite = jnp.isfinite(loss)
  return dict(
      run=jnp.where(skipped > 0, tracked["run"] + 1, 0),
      last_loss=jnp.where(finite, loss.astype(jnp.float32), tracked["last_loss"]),
      last_loss_step=jnp.where(finite, step, tracked["last_loss_step"]),
  )


def _read(x: Any) -> Any:
  """A replicated scalar on the host (also when other processes hold other shards)."""
  return np.asarray(x.addressable_data(0) if hasattr(x, "addressable_data") else x
                    ).item()


def check_limit(m: Any) -> int | None:
  """``train.max_consecutive_skipped`` checked: an int >= 1, or None (never stop)."""
  if m is not None and (isinstance(m, bool) or not isinstance(m, int) or m < 1):
    raise ValueError(f"train.max_consecutive_skipped={m!r} must be an int >= 1 or "
                     "None (never stop)")
  return m


class DivergenceGuard:
  """Consecutive skipped steps, on the device.

  Args:
    max_consecutive_skipped: ``train.max_consecutive_skipped``; None disables the stop
      (checkpoints of skipped steps are still withheld).
  """

  def __init__(self, max_consecutive_skipped: int | None):
    self.max_consecutive_skipped = check_limit(max_consecutive_skipped)
    # numpy, not device arrays: jit places them like the (global) metrics
    self._tracked = dict(run=np.zeros((), np.int32),
                         last_loss=np.full((), np.nan, np.float32),
                         last_loss_step=np.zeros((), np.int32))
    self._withheld = False

  def update(self, step: int, metrics: dict[str, jax.Array]) -> None:
    """Records step ``step``'s ``skipped`` and ``loss`` (asynchronously) and adds
    ``metrics["consecutive_skipped"]``, so that a log step reads it with the rest."""
    self._tracked = _track(self._tracked, metrics["skipped"], metrics["loss"],
                           np.asarray(step, np.int32))
    metrics["consecutive_skipped"] = self._tracked["run"]

  def may_save(self, step: int, log: Any = None) -> bool:
    """Whether a checkpoint of the state after ``step`` may be written: the newest
    step was not skipped (waits for the device; raises like :meth:`check`). ``log``
    (``str -> None``) hears about a withheld checkpoint."""
    run = int(_read(self._tracked["run"]))
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
    loss, at = _read(self._tracked["last_loss"]), _read(self._tracked["last_loss_step"])
    last = (f"the last finite loss was {loss:.4g} at step {at}" if np.isfinite(loss)
            else "no finite loss was seen in this run")
    raise TrainingDivergedError(
        f"training diverged: the last {run} steps up to step {step} were all skipped "
        f"(non-finite loss or gradients, train.max_consecutive_skipped={m}); {last}. "
        "The newest checkpoint is the last one before the divergence. Try a lower "
        "optimizer.learning_rate or a longer optimizer.warmup_steps, resuming with "
        "--config.train.allow_config_changes='(\"optimizer\",)', or a new --workdir.")
