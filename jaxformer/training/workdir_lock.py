"""One run per workdir: a lock file held by process 0 for the whole run.

Two runs on one workdir would resume from each other's checkpoints and overwrite each
other's checkpoints, metrics and summary. :func:`hold` takes ``<workdir>/run.lock``
before anything is written; a second run fails at once with a :class:`WorkdirLockedError`
that names the holder (pid, host, start time).

The lock is an ``flock`` on the file, which the kernel drops when the holder dies, so a
lock left by a killed run (``kill -9``, OOM, a crashed node) is taken over with a warning.
Where the filesystem has no ``flock``, the holder is judged alive by its pid on the same
host (a lock from another host is then only taken over once its file is removed).
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import logging
import os
import socket
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

log = logging.getLogger(__name__)

LOCK_NAME = "run.lock"


class WorkdirLockedError(RuntimeError):
  """Another live run holds the workdir's lock."""


def make_workdir(workdir: str) -> None:
  """Creates ``workdir`` (and its parents) and checks that files can be written in it.

  Raises:
    ValueError: ``workdir`` is a file (or under one).
    OSError: it cannot be created or written (a read-only file system: ``EROFS``;
      no permission: ``EACCES``), naming the path.
  """
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ValueError(f"workdir {workdir!r} is a file, not a directory: give a directory "
                     "(it is created if missing)")
  above = os.path.dirname(os.path.abspath(workdir))
  while not os.path.exists(above) and above != os.path.dirname(above):
    above = os.path.dirname(above)
  if not os.path.isdir(above):
    raise ValueError(f"workdir {workdir!r} cannot be a directory: {above!r} is a file")
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, f".write-probe-{socket.gethostname()}-{os.getpid()}")
    with open(probe, "w", encoding="utf-8"):
      pass
    os.remove(probe)
  except (FileExistsError, NotADirectoryError) as e:
    raise ValueError(f"workdir {workdir!r} cannot be a directory: "
                     f"{e.filename or workdir!r} is a file") from e
  except OSError as e:
    error = OSError(e.errno, e.strerror or str(e), e.filename or workdir)
    error.add_note(f"the workdir {workdir!r} must be writable")
    raise error from e


def _proc_start(pid: int) -> str | None:
  """The kernel's start time of ``pid`` (tells a reused pid apart), or None."""
  try:
    with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
      return f.read().rsplit(")", 1)[1].split()[19]
  except (OSError, IndexError):
    return None


def _pid_alive(holder: dict[str, Any]) -> bool:
  """Whether the holder recorded in a lock file runs on this host right now."""
  pid = holder.get("pid")
  if holder.get("host") != socket.gethostname() or not isinstance(pid, int):
    return True  # another host (or unreadable): cannot tell, assume alive
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    pass  # exists, owned by someone else
  started = holder.get("proc_start")
  return started is None or _proc_start(pid) in (None, started)


def describe(holder: dict[str, Any]) -> str:
  return (f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}, "
          f"started {holder.get('start_time', '?')}")


class WorkdirLock:
  """``<workdir>/run.lock``: :meth:`acquire` or raise, :meth:`release` when done.

  Args:
    workdir: the run's directory (created if missing).
  """

  def __init__(self, workdir: str):
    self.workdir = workdir
    self.path = os.path.join(workdir, LOCK_NAME)
    self._fd: int | None = None

  def _read(self, fd: int) -> dict[str, Any]:
    os.lseek(fd, 0, os.SEEK_SET)
    try:
      holder = json.loads(os.read(fd, 1 << 16).decode("utf-8") or "{}")
    except (UnicodeDecodeError, json.JSONDecodeError):
      return {}
    return holder if isinstance(holder, dict) else {}

  def acquire(self) -> dict[str, Any]:
    """Takes the lock; returns the previous (dead) holder's record, ``{}`` if none.

    Raises:
      WorkdirLockedError: a live run holds it (the message names pid, host, start).
    """
    os.makedirs(self.workdir, exist_ok=True)
    while True:
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        flock_ok = True
      except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
          holder = self._read(fd)
          os.close(fd)
          raise WorkdirLockedError(
              f"workdir {self.workdir} is in use by another run ({describe(holder)}); "
              f"wait for it, stop it, or use another --workdir (lock: {self.path})"
          ) from None
        flock_ok = False  # no flock on this filesystem: judge by the recorded pid
      # The file may have been removed and recreated between open and flock.
      if os.fstat(fd).st_ino == os.stat(self.path).st_ino:
        break
      os.close(fd)
    previous = self._read(fd)
    if previous and not flock_ok and _pid_alive(previous):
      os.close(fd)
      raise WorkdirLockedError(
          f"workdir {self.workdir} is in use by another run ({describe(previous)}); "
          f"if that run is gone, delete {self.path}")
    if previous:
      log.warning("workdir %s: taking over the lock of a run that ended without "
                  "releasing it (%s)", self.workdir, describe(previous))
    record = dict(pid=os.getpid(), host=socket.gethostname(),
                  start_time=datetime.datetime.now().astimezone().isoformat(
                      timespec="seconds"),
                  proc_start=_proc_start(os.getpid()))
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, json.dumps(record).encode("utf-8"))
    os.fsync(fd)
    self._fd = fd
    return previous

  def release(self) -> None:
    """Empties the lock file (an empty file = a run that ended cleanly) and unlocks."""
    if self._fd is None:
      return
    os.ftruncate(self._fd, 0)
    os.close(self._fd)  # drops the flock
    self._fd = None


@contextlib.contextmanager
def hold(workdir: str) -> Iterator[None]:
  """Holds ``workdir``'s lock on process 0 for the ``with`` body (all processes agree).

  Raises:
    WorkdirLockedError: on every process, when process 0 could not take the lock.
  """
  lock = WorkdirLock(workdir) if jax.process_index() == 0 else None
  error = None
  if lock is not None:
    try:
      lock.acquire()
    except WorkdirLockedError as e:
      error = e
  if jax.process_count() > 1:  # the other processes must not start training alone
    failed = multihost_utils.process_allgather(np.asarray(error is not None, np.int32))
    if np.asarray(failed).any() and error is None:
      error = WorkdirLockedError(f"workdir {workdir}: process 0 could not take its lock")
  if error is not None:
    raise error
  try:
    yield
  finally:
    if lock is not None:
      lock.release()
