"""Checkpoints with orbax: train state + data iterator state + config, and preemption.

Layout: ``<workdir>/checkpoints/<step>/{state,data,config}``; written asynchronously
by ``ocp.CheckpointManager`` (keep the newest ``max_to_keep``). Unfinished saves live in
``*.orbax-checkpoint-tmp-*`` directories, which orbax never lists as steps, so a run
killed mid-save resumes from the last complete checkpoint.

* ``state``: the ``TrainState`` (``StandardSave``; restored into an abstract target of
  ``jax.ShapeDtypeStruct(..., sharding=...)`` leaves, so it lands directly sharded).
* ``data``: the data iterator's ``get_state()`` (``JsonSave``; bytes are base64-coded)
  and the data's fingerprint (:mod:`jaxformer.data.fingerprint`).
  With several processes, each reads its own shard in lockstep; the saved state is
  process 0's position, which is the same for all processes.
* ``config``: the run's config as JSON (the loop compares it with the new one on
  resume, :mod:`jaxformer.training.resume_check`).

A directory that cannot be written fails at once (not minutes later in orbax's writer
thread); leftover ``*.orbax-checkpoint-tmp*`` directories of killed saves are removed at
start. :meth:`Checkpointer.restore_latest` resumes from the newest checkpoint that
restores completely, moving damaged newer ones aside (kept, under ``<dir>.damaged``).

SIGTERM (preemption, ``scancel``, ``kill``) and SIGINT (Ctrl-C) only set a flag
(:class:`Preemption`); the loop notices it between steps, saves, waits for the write to
finish and exits cleanly. A repeated SIGTERM changes nothing (the save in flight is
finished); a second Ctrl-C interrupts at once (``KeyboardInterrupt``).
"""

from __future__ import annotations

import base64
import contextlib
import errno
import logging
import os
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

log = logging.getLogger(__name__)

_BYTES_KEY = "__bytes_b64__"


def _to_json(value: Any) -> Any:
  """JSON-safe copy: bytes -> {"__bytes_b64__": ...}, tuples -> lists, numpy -> py."""
  if isinstance(value, bytes):
    return {_BYTES_KEY: base64.b64encode(value).decode("ascii")}
  if isinstance(value, Mapping):
    return {str(k): _to_json(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_to_json(v) for v in value]
  if hasattr(value, "item") and getattr(value, "ndim", None) == 0:
    return value.item()
  if hasattr(value, "tolist"):
    return value.tolist()
  return value


def _from_json(value: Any) -> Any:
  if isinstance(value, Mapping):
    if set(value) == {_BYTES_KEY}:
      return base64.b64decode(value[_BYTES_KEY])
    return {k: _from_json(v) for k, v in value.items()}
  if isinstance(value, list):
    return [_from_json(v) for v in value]
  return value


def config_mismatches(stored: Mapping[str, Any], current: Mapping[str, Any],
                      prefix: str = "") -> list[str]:
  """Human-readable differences ``"name: checkpoint X != config Y"`` (recursive)."""
  stored = _to_json(stored)
  current = _to_json(current)
  out = []
  for key in sorted(set(stored) | set(current)):
    name = f"{prefix}{key}"
    if key not in stored:
      out.append(f"{name}: missing in checkpoint, config {current[key]!r}")
    elif key not in current:
      out.append(f"{name}: checkpoint {stored[key]!r}, missing in config")
    elif isinstance(stored[key], Mapping) and isinstance(current[key], Mapping):
      out.extend(config_mismatches(stored[key], current[key], f"{name}."))
    elif stored[key] != current[key]:
      out.append(f"{name}: checkpoint {stored[key]!r} != config {current[key]!r}")
  return out


def _no_replica_slices_on_cpu() -> None:
  """On CPU, orbax writes each replicated array whole, from one replica.

  Its default (replica-parallel saving) cuts every replicated array into one slice a
  replica with an eager ``lax.slice_in_dim`` per array and replica: on a 2-device
  CPU run that is 314 small dispatched programs (and 20 compiles) a save for a
  4 x 128 GPT's state, about 0.4 s of the host's time, with nothing gained, since all
  CPU devices of a process share its memory. GPU and TPU keep orbax's default.
  """
  handler = ocp.type_handlers.get_type_handler(jax.Array)
  if jax.default_backend() != "cpu" or (
      isinstance(handler, ocp.type_handlers.ArrayHandler)
      and not getattr(handler, "_use_replica_parallel", True)):
    return
  absl_logger = logging.getLogger("absl")   # orbax warns of the override: expected
  level = absl_logger.level
  absl_logger.setLevel(logging.ERROR)
  try:
    ocp.type_handlers.register_type_handler(
        jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=False),
        override=True)
  finally:
    absl_logger.setLevel(level)


class Checkpointer:
  """Saves / restores ``(state, data iterator state, config)`` under ``directory``.

  Args:
    directory: where step directories go (created if missing).
    max_to_keep: newest checkpoints kept (``None`` = all).
    save_every: save when ``step % save_every == 0`` (``force=True`` saves anyway).
    async_save: write in a background thread (call :meth:`wait` before reading or
      exiting; :meth:`close` waits too).
    check_sections: top-level config sections that must match on restore.
    read_only: only read (e.g. another run's checkpoints): the directory is not
      created, probed or cleaned of unfinished saves (which may be in flight).
  """

  def __init__(self, directory: str | epath.PathLike, *, max_to_keep: int | None = 3,
               save_every: int = 1, async_save: bool = True,
               check_sections: tuple[str, ...] = ("model",), read_only: bool = False):
    if save_every < 1:
      raise ValueError(f"save_every={save_every!r} must be >= 1")
    if max_to_keep is not None and max_to_keep < 1:
      raise ValueError(f"max_to_keep={max_to_keep!r} must be >= 1 or None")
    _no_replica_slices_on_cpu()
    # orbax's tensorstore writer rejects relative paths; resolve against the cwd.
    self.directory = epath.Path(os.path.abspath(os.fspath(directory)))
    self.save_every = save_every
    self.check_sections = check_sections
    if jax.process_index() == 0 and not read_only:
      _check_writable(os.fspath(self.directory))
      _remove_tmp_dirs(os.fspath(self.directory))
    if jax.process_count() > 1 and not read_only:
      multihost_utils.sync_global_devices("jaxformer_checkpointer_init")
    self._closed = False
    self._in_flight: int | None = None  # the step of an async save not known done
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            enable_async_checkpointing=async_save,
            create=not read_only,
            read_only=read_only,
        ),
        item_names=("state", "data", "config"),
    )

  def latest_step(self) -> int | None:
    """Newest *complete* checkpoint step (tmp dirs of unfinished saves are ignored)."""
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def should_save(self, step: int) -> bool:
    """Whether :meth:`save` (without ``force``) would save at ``step``."""
    return step % self.save_every == 0 and step not in self._manager.all_steps()

  def save(self, step: int, state: Any, *, data_state: Any = None,
           config: Mapping[str, Any] | None = None, force: bool = False,
           fingerprint: Mapping[str, Any] | None = None) -> bool:
    """Starts saving (asynchronously); returns whether a save was started.

    ``fingerprint`` (:mod:`jaxformer.data.fingerprint`) is stored with the data
    iterator's state (:meth:`stored_fingerprint` reads it back).

    Raises:
      OSError: this save, or the previous one still in flight, cannot be written
        (``ENOSPC`` when the disk is full, before anything is written when the free
        space is short of the checkpoint's size); it names the step's directory and
        the last good checkpoint, which is kept.
    """
    if not force and step % self.save_every:
      return False
    if step in self._manager.all_steps():
      return False
    self._check_space(step, state)
    with self._save_errors(step):
      started = self._manager.save(
          step,
          args=ocp.args.Composite(
              state=ocp.args.StandardSave(state),
              data=ocp.args.JsonSave(_to_json({"iterator": data_state,
                                               "fingerprint": fingerprint})),
              config=ocp.args.JsonSave(_to_json(config or {})),
          ),
          force=True,
      )
    self._in_flight = step if started else None
    return started

  def _check_space(self, step: int, state: Any) -> None:
    """ENOSPC before a save that cannot fit in the free space: orbax would find out
    half-way, in its writer threads. A checkpoint needs about what the newest one
    takes on disk (else the state's bytes), plus what the save in flight still has
    to write. Process 0 measures; every process raises (a collective)."""
    short = None
    if jax.process_index() == 0:
      short = _space_shortfall(os.fspath(self.directory), step, state, self._in_flight)
    if any_process(short is not None):
      raise self._kept_note(OSError(
          errno.ENOSPC, f"{os.strerror(errno.ENOSPC)}: {short or 'on process 0'}",
          os.path.join(os.fspath(self.directory), str(step))))

  @contextlib.contextmanager
  def _save_errors(self, step: int | None):
    """Errors of a save (this one or the one in flight) as one OSError (see save)."""
    try:
      yield
    except Exception as e:  # pylint: disable=broad-except
      failed = self._in_flight if self._in_flight is not None else step
      self._in_flight = None
      raise self._write_error(e, failed) from e

  def _write_error(self, error: Exception, step: int | None) -> OSError:
    text = f"{error}"
    code = error.errno if isinstance(error, OSError) and error.errno else None
    if code is None and ("No space left on device" in text or
                         "os_error_code='28'" in text):
      code = errno.ENOSPC
    path = os.fspath(self.directory)
    path = path if step is None else os.path.join(path, str(step))
    if code is not None:
      new = OSError(code, os.strerror(code), path)
    else:
      first = " ".join(f"{type(error).__name__}: {text}".split())[:300]
      new = OSError(errno.EIO, f"saving a checkpoint failed ({first})", path)
    if jax.process_index() == 0:  # the unfinished save: not a checkpoint, only space
      _remove_tmp_dirs(os.fspath(self.directory))
    return self._kept_note(new)

  def _kept_note(self, error: OSError) -> OSError:
    try:
      kept = self._manager.latest_step()
    except Exception:  # pylint: disable=broad-except
      kept = None
    error.add_note(f"the last good checkpoint, step {kept}, is kept" if kept is not None
                   else "no checkpoint was written")
    return error

  def stored_config(self, step: int) -> dict[str, Any]:
    restored = self._manager.restore(
        step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
    return dict(restored["config"] or {})

  def stored_fingerprint(self, step: int) -> dict[str, Any] | None:
    """The data fingerprint saved with ``step`` (None for a checkpoint without one)."""
    restored = self._manager.restore(
        step, args=ocp.args.Composite(data=ocp.args.JsonRestore()))
    return _from_json(restored["data"] or {}).get("fingerprint")

  def check_config(self, step: int, config: Mapping[str, Any]) -> None:
    """Raises ValueError naming fields where the stored config's checked sections
    differ from ``config``'s."""
    stored = self.stored_config(step)
    current = _to_json(config)
    diffs = []
    for section in self.check_sections:
      diffs += config_mismatches({section: stored.get(section, {})},
                                 {section: current.get(section, {})})
    if diffs:
      raise ValueError(
          f"checkpoint {self.directory / str(step)} was written with a different "
          "config; mismatching fields:\n  " + "\n  ".join(diffs) +
          "\nUse another --workdir, or the checkpoint's values.")

  def restore(self, step: int, abstract_state: Any, *,
              config: Mapping[str, Any] | None = None) -> tuple[Any, Any]:
    """Restores ``(state, data_state)`` from ``step``.

    Args:
      step: checkpoint step.
      abstract_state: pytree of ``jax.ShapeDtypeStruct(shape, dtype, sharding=...)``.
      config: when given, checked against the stored config first (ValueError).
    """
    if config is not None:
      self.check_config(step, config)
    restored = self._manager.restore(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state),
            data=ocp.args.JsonRestore(),
        ),
    )
    data = _from_json(restored["data"] or {})
    return restored["state"], data.get("iterator")

  def restore_latest(self, abstract_state: Any, *,
                     check: Callable[[int, dict[str, Any]], None] | None = None,
                     use: Callable[[Any, Any], None] | None = None
                     ) -> tuple[int, Any, Any] | None:
    """Restores the newest checkpoint that restores completely, or None if none exist.

    A checkpoint whose config, state or data state cannot be read (a truncated array
    file, a deleted ``state/``, bad JSON) is skipped with a warning naming it, and moved
    to ``<directory>.damaged/<step>`` (kept for inspection; its step can be saved anew).

    Args:
      abstract_state: as for :meth:`restore`.
      check: ``(step, stored config) -> None``, called before restoring; its errors
        (e.g. a config mismatch) propagate - they are not damage.
      use: ``(state, data_state) -> None``, called after restoring (e.g. setting the
        data iterator); an error there counts as damage too.
    Returns:
      ``(step, state, data_state)``.
    Raises:
      ValueError: checkpoints exist but none restores (each one's error is named).
    """
    errors = []
    for step in sorted(self.all_steps(), reverse=True):
      try:
        stored = self.stored_config(step)
        error = None
      except Exception as e:  # pylint: disable=broad-except
        error = e
      if not any_process(error is not None):
        if check is not None:
          check(step, stored)
        try:
          state, data_state = self.restore(step, abstract_state)
          if use is not None:
            use(state, data_state)
        except Exception as e:  # pylint: disable=broad-except
          error = e
        if not any_process(error is not None):
          return step, state, data_state
      errors.append(f"step {step}: {type(error).__name__}: {error}"[:500])
      self._move_aside(step, error)
    if errors:
      raise ValueError(f"no checkpoint in {self.directory} restores:\n  " +
                       "\n  ".join(errors))
    return None

  def _move_aside(self, step: int, error: Exception | None) -> None:
    src = os.path.join(os.fspath(self.directory), str(step))
    dst = os.path.join(os.fspath(self.directory) + ".damaged",
                       f"{step}-{time.strftime('%Y%m%d-%H%M%S')}")
    log.warning("checkpoint %s does not restore (%s); skipped and moved to %s",
                src, error or "failed on another process", dst)
    if jax.process_index() == 0:
      os.makedirs(os.path.dirname(dst), exist_ok=True)
      shutil.move(src, dst)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"jaxformer_move_aside_{step}")
    self._manager.reload()

  def wait(self) -> None:
    """Waits for the save in flight (OSError as :meth:`save` when it failed)."""
    with self._save_errors(None):
      self._manager.wait_until_finished()
    self._in_flight = None

  def close(self) -> None:
    """Waits for the save in flight, then releases orbax's threads (idempotent; an
    OSError as :meth:`save` when the save failed, after the threads are released)."""
    if self._closed:
      return
    self._closed = True
    try:
      self.wait()
    finally:
      try:
        self._manager.close()
      except Exception as e:  # pylint: disable=broad-except
        log.error("closing the checkpoint manager failed: %s", e)

  def __enter__(self) -> Checkpointer:
    return self

  def __exit__(self, exc_type, exc, tb) -> None:
    if exc_type is None:
      self.close()
      return
    try:  # already failing: don't let a second error from the writer hide the first
      self.close()
    except Exception as e:  # pylint: disable=broad-except
      log.error("closing the checkpointer after an error failed too: %s", e)


def _space_shortfall(directory: str, step: int, state: Any,
                     in_flight: int | None) -> str | None:
  """``"<free> bytes free, checkpoint <step> needs about <n>"`` when a checkpoint will
  not fit in ``directory``'s free space, else None (also when it cannot be told)."""
  try:
    names = os.listdir(directory)
    free = shutil.disk_usage(directory).free
  except OSError:
    return None
  done = [int(n) for n in names if n.isdigit()]
  if done:
    size = _disk_size(os.path.join(directory, str(max(done))))
  else:
    size = sum(int(getattr(x, "nbytes", 0)) for x in jax.tree.leaves(state))
  written = sum(_disk_size(os.path.join(directory, n)) for n in names
                if ".orbax-checkpoint-tmp" in n)
  unfinished = in_flight is not None and str(in_flight) not in names
  need = size + (max(size - written, 0) if unfinished else 0)
  if need <= free:
    return None
  return f"{free:,} bytes free, checkpoint {step} needs about {need:,}"


def _disk_size(path: str) -> int:
  """Bytes the files under ``path`` take on disk (whole blocks)."""
  total = 0
  for root, _, files in os.walk(path):
    for name in files:
      try:
        total += os.stat(os.path.join(root, name)).st_blocks * 512
      except OSError:
        pass
  return total


def _check_writable(directory: str) -> None:
  """Creates ``directory`` and writes a probe file, or raises naming path and reason."""
  try:
    os.makedirs(directory, exist_ok=True)
    with tempfile.TemporaryFile(dir=directory):
      pass
  except OSError as e:
    raise ValueError(f"cannot write checkpoints to {directory}: "
                     f"{e.strerror or e} ({e.filename or directory})") from e


def _remove_tmp_dirs(directory: str) -> None:
  """Removes ``*.orbax-checkpoint-tmp*`` left by saves that were killed (the workdir
  lock guarantees that no other run is writing them)."""
  for name in sorted(os.listdir(directory)):
    if ".orbax-checkpoint-tmp" in name:
      log.warning("removing %s, left by an unfinished save",
                  os.path.join(directory, name))
      shutil.rmtree(os.path.join(directory, name), ignore_errors=True)


class Preemption:
  """A SIGTERM / SIGINT flag: the handler only records the request; the loop acts on it.

  A second SIGINT raises ``KeyboardInterrupt`` at once (for a user who will not wait);
  a second SIGTERM is only logged (schedulers repeat it: the save in flight finishes).
  Nested instances share the outer one's flag, so a signal that arrives before the loop
  (e.g. while compiling) still stops the loop at its first step.

  Usage::

    with Preemption() as preempt:
      for step in ...:
        ...
        if preempt.requested:   # (agreed across processes by the loop)
          save; break
  """

  def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)):
    self._event = threading.Event()
    self._signals = signals
    self._previous: dict[int, Any] = {}

  @property
  def requested(self) -> bool:
    return self._event.is_set()

  def request(self) -> None:
    self._event.set()

  def _handler(self, signum, frame):
    del frame
    if self._event.is_set():
      if signum == signal.SIGINT:  # a user at the keyboard who will not wait
        raise KeyboardInterrupt(f"second signal {signum}: stopping now")
      # A scheduler repeating SIGTERM: the save in flight is finished, then the
      # run exits as after the first one (interrupting it would lose that save).
      log.warning("received signal %d again: already saving a checkpoint and "
                  "exiting", signum)
      return
    log.warning("received signal %d: will save a checkpoint and exit (Ctrl-C again "
                "to stop at once)", signum)
    self._event.set()

  def __enter__(self) -> Preemption:
    if threading.current_thread() is threading.main_thread():
      for s in self._signals:
        outer = getattr(signal.getsignal(s), "__self__", None)
        if isinstance(outer, Preemption):
          self._event = outer._event  # pylint: disable=protected-access
        self._previous[s] = signal.signal(s, self._handler)
    return self

  def __exit__(self, *exc) -> None:
    for s, h in self._previous.items():
      signal.signal(s, h)
    self._previous.clear()


def any_process(flag: bool) -> bool:
  """True if ``flag`` is set on any process (a collective: every process must call)."""
  if jax.process_count() == 1:
    return flag
  flags = multihost_utils.process_allgather(np.asarray(flag, np.int32))
  return bool(np.asarray(flags).any())
