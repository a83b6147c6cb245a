"""The divergence guard: consecutive skipped steps read only when asked, the stop and its
message, checkpoints withheld while the newest step was skipped."""

from __future__ import annotations

import numpy as np
import pytest

from jaxformer.training import divergence


def _feed(guard, losses):
  rows = []
  for step, loss in enumerate(losses, start=1):
    metrics = {"loss": np.float32(loss), "skipped": np.float32(not np.isfinite(loss))}
    guard.update(step, metrics)
    rows.append(guard.read(step))
  return rows


def test_counts_runs_and_stops_with_step_and_last_finite_loss():
  guard = divergence.DivergenceGuard(3)
  nan = float("nan")
  assert _feed(guard, [2.5, nan, nan, 2.0, nan, nan]) == [0, 1, 2, 0, 1, 2]
  guard.check(6, 2)  # below the limit: nothing
  assert not guard.may_save(6)
  _feed(guard, [nan])
  with pytest.raises(divergence.TrainingDivergedError) as e:
    guard.check(7, 3)
  message = str(e.value)
  assert "up to step 7" in message and "last finite loss was 2 at step 4" in message
  assert "optimizer.learning_rate" in message
  with pytest.raises(divergence.TrainingDivergedError):
    guard.may_save(7)  # a checkpoint step also stops


def test_may_save_logs_once_per_run_and_none_disables_the_stop():
  guard = divergence.DivergenceGuard(None)
  logged = []
  _feed(guard, [1.0] + [float("inf")] * 50)
  assert not guard.may_save(51, logged.append)
  assert not guard.may_save(52, logged.append)
  assert len(logged) == 1 and "not saving a checkpoint at step 51" in logged[0]
  guard.check(51, 50)  # None: never stops
  _feed(guard, [1.0])
  assert guard.may_save(53, logged.append)


class _Unreadable:
  """A device value that must not be read (fails if converted)."""

  def __array__(self, *args, **kwargs):
    raise AssertionError("read a value that should stay on the device")


def test_update_reads_nothing_and_read_stops_at_its_step():
  guard = divergence.DivergenceGuard(2)
  _feed(guard, [1.0, float("nan")])
  guard.update(3, {"loss": _Unreadable(), "skipped": _Unreadable()})  # in flight
  assert guard.read(2) == 1   # step 3 stays unread
  with pytest.raises(AssertionError, match="should stay on the device"):
    guard.read(3)


def test_unread_steps_are_bounded_and_counted_exactly():
  guard = divergence.DivergenceGuard(None)
  n = divergence._MAX_PENDING + 10
  for step in range(1, n + 1):
    guard.update(step, {"loss": np.float32(1.0), "skipped": np.float32(step > n - 7)})
  assert len(guard._pending) <= divergence._MAX_PENDING
  assert guard.read(n) == 7 and not guard._pending


@pytest.mark.parametrize("value", [0, -1, 2.5, True])
def test_bad_max_consecutive_skipped(value):
  with pytest.raises(ValueError, match="train.max_consecutive_skipped"):
    divergence.DivergenceGuard(value)


if __name__ == "__main__":
  pytest.main([__file__])
