"""A full disk, simulated by patching a writer to fail with ENOSPC as a full disk makes
it fail (no file name; a partial write first where Python buffers).

In a test process: ``with metrics_full(n):`` the n-th row written to ``metrics.jsonl``
fails; ``with checkpoint_full(step):`` the save of checkpoint ``step`` fails in orbax's
background thread. As a command, the real training CLI under the patch::

  python tests/training/full_disk.py checkpoint STEP -- <experiments.train flags>
"""

from __future__ import annotations

import contextlib
import errno
import os
import runpy
import sys
from unittest import mock


def _enospc() -> OSError:
  return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


class _FullFile:
  """A text file whose ``fail_at``-th write stores 5 characters, then fails."""

  def __init__(self, f, fail_at: int):
    self._f, self._fail_at, self._writes = f, fail_at, 0
    self.name = f.name

  def write(self, text: str) -> int:
    self._writes += 1
    if self._writes >= self._fail_at:
      self._f.write(text[:5])
      self._f.flush()
      raise _enospc()
    return self._f.write(text)

  def flush(self) -> None:
    self._f.flush()

  def close(self) -> None:
    self._f.close()


@contextlib.contextmanager
def metrics_full(fail_at: int):
  from jaxformer.training import metrics_logger  # pylint: disable=g-import-not-at-top

  def full_open(path, *args, **kwargs):
    f = open(path, *args, **kwargs)  # noqa: SIM115
    return _FullFile(f, fail_at) if path.endswith("metrics.jsonl") else f
  with mock.patch.object(metrics_logger, "open", full_open, create=True):
    yield


@contextlib.contextmanager
def checkpoint_full(step: int):
  # pylint: disable-next=g-import-not-at-top
  from orbax.checkpoint._src.handlers import json_checkpoint_handler as h
  save = h.JsonCheckpointHandler._save_fn  # pylint: disable=protected-access

  async def full_save(self, x, directory):
    step_dir = os.path.basename(os.path.dirname(os.fspath(directory)))  # 4.orbax-...
    if step_dir.split(".")[0] == str(step):
      raise _enospc()
    return await save(self, x, directory)
  with mock.patch.object(h.JsonCheckpointHandler, "_save_fn", full_save):
    yield


if __name__ == "__main__":
  what, number, sep, *flags = sys.argv[1:]
  assert what == "checkpoint" and sep == "--", sys.argv
  sys.argv = ["experiments.train", *flags]
  with checkpoint_full(int(number)):
    runpy.run_module("experiments.train", run_name="__main__", alter_sys=True)
