"""The workdir lock: one run per workdir, the holder named, stale locks taken over."""

from __future__ import annotations

import errno
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from jaxformer.training import loop
from jaxformer.training import workdir_lock

import training_helpers as th


def test_second_lock_fails_naming_the_holder(tmp_path):
  first = workdir_lock.WorkdirLock(str(tmp_path / "w"))
  assert first.acquire() == {}  # creates the workdir; no previous holder
  with pytest.raises(workdir_lock.WorkdirLockedError) as e:
    workdir_lock.WorkdirLock(str(tmp_path / "w")).acquire()
  message = str(e.value)
  assert f"pid {os.getpid()}" in message and socket.gethostname() in message
  assert "started 20" in message and str(tmp_path / "w") in message
  first.release()
  second = workdir_lock.WorkdirLock(str(tmp_path / "w"))
  assert second.acquire() == {}  # a clean release leaves no previous holder
  second.release()


def test_lock_of_a_killed_run_is_taken_over(tmp_path, caplog):
  code = ("import sys, time; from jaxformer.training import workdir_lock; "
          "workdir_lock.WorkdirLock(sys.argv[1]).acquire(); print('held', flush=True); "
          "time.sleep(600)")
  env = dict(os.environ, PYTHONPATH=th.REPO_ROOT)
  child = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], env=env,
                           stdout=subprocess.PIPE, text=True)
  try:
    assert child.stdout.readline().strip() == "held"
    with pytest.raises(workdir_lock.WorkdirLockedError, match=f"pid {child.pid} "):
      workdir_lock.WorkdirLock(str(tmp_path)).acquire()
  finally:
    child.send_signal(signal.SIGKILL)
    child.wait()
  lock = workdir_lock.WorkdirLock(str(tmp_path))
  with caplog.at_level(logging.WARNING):
    previous = lock.acquire()
  assert previous["pid"] == child.pid
  assert f"pid {child.pid}" in caplog.text and "taking over" in caplog.text
  with open(lock.path) as f:
    assert json.load(f)["pid"] == os.getpid()
  lock.release()


def test_without_flock_the_recorded_pid_decides(tmp_path, monkeypatch):
  def no_flock(fd, op):
    raise OSError(errno.ENOLCK, "no locks here")
  monkeypatch.setattr(workdir_lock.fcntl, "flock", no_flock)
  path = tmp_path / workdir_lock.LOCK_NAME
  live = dict(pid=os.getpid(), host=socket.gethostname(), start_time="t0",
              proc_start=workdir_lock._proc_start(os.getpid()))
  path.write_text(json.dumps(live))
  with pytest.raises(workdir_lock.WorkdirLockedError, match=f"delete {path}"):
    workdir_lock.WorkdirLock(str(tmp_path)).acquire()
  dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                        capture_output=True, text=True, check=True)
  path.write_text(json.dumps(dict(live, pid=int(dead.stdout))))  # exited: stale
  assert workdir_lock.WorkdirLock(str(tmp_path)).acquire()["pid"] == int(dead.stdout)
  path.write_text(json.dumps(dict(live, host="elsewhere")))  # cannot tell: refuse
  with pytest.raises(workdir_lock.WorkdirLockedError, match="host elsewhere"):
    workdir_lock.WorkdirLock(str(tmp_path)).acquire()


def test_train_on_a_locked_workdir_fails_at_once(tmp_path):
  lock = workdir_lock.WorkdirLock(str(tmp_path))
  lock.acquire()
  t0 = time.perf_counter()
  with pytest.raises(workdir_lock.WorkdirLockedError, match=f"pid {os.getpid()}"):
    loop.train(th.tiny_config(), str(tmp_path))
  assert time.perf_counter() - t0 < 10
  assert sorted(os.listdir(tmp_path)) == [workdir_lock.LOCK_NAME]  # nothing written
  lock.release()
  with workdir_lock.hold(str(tmp_path)):  # process 0 takes it for the `with` body
    with pytest.raises(workdir_lock.WorkdirLockedError):
      workdir_lock.WorkdirLock(str(tmp_path)).acquire()
  workdir_lock.WorkdirLock(str(tmp_path)).acquire()  # released again


if __name__ == "__main__":
  pytest.main([__file__])
