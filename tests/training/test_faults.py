"""Faults a run must survive with nothing lost and one clear line: a full disk during an
asynchronous checkpoint save (the real command under a patched writer) and during a
metrics write, a checkpoint that cannot fit, a damaged summary.json, a workdir that is a
file or read-only; and (sharing a run) a resume on another device count."""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import subprocess
from unittest import mock

import pytest

from experiments.configs import gpt_bytes
from jaxformer.training import checkpoint as ckpt_lib
from jaxformer.training import loop

import full_disk
import training_helpers as th

# The CLI run and its in-process resume share this config.
OVERRIDES = dict(num_steps=6, checkpoint_every=2, log_every=1, eval_every=1000,
                 tensorboard=False, progress=False, async_checkpoint=True)


def _cli_config():
  c = gpt_bytes.get_config("tiny")
  c.train.update(OVERRIDES)
  c.task_options.sample_tokens = 0
  c.sharding.cpu_devices = 0
  return c


def _rows(workdir):
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


def _loss_steps(workdir):
  return [r["step"] for r in _rows(workdir) if "loss" in r]


def _leftovers(workdir):
  return [n for n in os.listdir(os.path.join(workdir, "checkpoints"))
          if "tmp" in n]


@pytest.mark.slow  # the real command, ~15-30 s
def test_full_disk_during_an_async_save_is_one_line_and_loses_nothing(tmp_path):
  workdir = str(tmp_path / "run")
  flags = [f"--workdir={workdir}", "--config=experiments/configs/gpt_bytes.py:tiny",
           "--config.sharding.cpu_devices=0", "--config.task_options.sample_tokens=0",
           *(f"--config.train.{k}={v}" for k, v in OVERRIDES.items())]
  proc = th.run_python(["tests/training/full_disk.py", "checkpoint", "4", "--", *flags],
                       timeout=300)
  lines = proc.stderr.strip().splitlines()
  assert proc.returncode == 1, proc.stderr[-3000:]
  assert lines[-1] == (f"error: No space left on device (ENOSPC): {workdir}/checkpoints/4"
                       "; the last good checkpoint, step 2, is kept  (--verbose: "
                       "traceback)"), proc.stderr[-3000:]
  for crash in ("Traceback", "Exception ignored", "meta_path", "Fatal Python"):
    assert crash not in proc.stderr, proc.stderr[-3000:]
  assert ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"),
                               read_only=True).all_steps() == [2]
  assert not _leftovers(workdir)
  summary = loop.train(_cli_config(), workdir)  # space again: resume, each step once
  assert summary["step"] == 6 and _loss_steps(workdir) == [1, 2, 3, 4, 5, 6]


def test_full_disk_during_a_metrics_write_names_the_file_and_resumes(tmp_path, capsys):
  workdir = str(tmp_path)
  config = th.tiny_config(num_steps=6, checkpoint_every=2, async_checkpoint=True)
  with full_disk.metrics_full(5), pytest.raises(OSError) as info:
    loop.train(config, workdir)  # rows 1-4 are written, the 5th fails half-way
  error = info.value
  assert error.errno == errno.ENOSPC
  assert error.filename == os.path.join(workdir, "metrics.jsonl")
  assert "the rows up to the last checkpoint are kept" in error.__notes__[0]
  assert ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"),
                               read_only=True).all_steps() == [2, 4]
  summary = loop.train(config, workdir)
  assert summary["step"] == 6 and _loss_steps(workdir) == [1, 2, 3, 4, 5, 6]
  assert not _leftovers(workdir)

  # The same finished run, its summary.json cut off: rebuilt, not an error.
  path = os.path.join(workdir, "summary.json")
  with open(path, encoding="utf-8") as f:
    text = f.read()
  with open(path, "w", encoding="utf-8") as f:
    f.write(text[:len(text) // 2])
  again = loop.train(config, workdir)
  assert again["step"] == 6 and again["loss"] == pytest.approx(summary["loss"])
  with open(path, encoding="utf-8") as f:
    assert json.load(f)["step"] == 6

  # Resumed on another device count: allowed, logged as altering the trajectory.
  more = th.tiny_config(num_steps=7, checkpoint_every=2, async_checkpoint=True)
  more.sharding.cpu_devices = 2  # (this process keeps its devices: JAX is running)
  capsys.readouterr()
  assert loop.train(more, workdir)["step"] == 7
  assert ("resuming on another device layout: sharding.cpu_devices: 0 -> 2. Allowed, "
          "but it alters the trajectory") in capsys.readouterr().out
  assert {"step": 6, "config_changes": {"sharding.cpu_devices": {
      "old": 0, "new": 2, "alters_trajectory": True}}} in _rows(workdir)


def test_a_checkpoint_that_cannot_fit_is_refused_before_writing(tmp_path):
  state = {"w": __import__("numpy").zeros(1000, "float32")}
  directory = str(tmp_path / "checkpoints")
  with ckpt_lib.Checkpointer(directory, async_save=False) as ck:
    ck.save(1, state, force=True)
    free = shutil.disk_usage(directory)._replace(free=100)
    with mock.patch.object(shutil, "disk_usage", return_value=free):
      with pytest.raises(OSError) as info:
        ck.save(2, state, force=True)
    assert info.value.errno == errno.ENOSPC
    assert info.value.filename == os.path.join(directory, "2")
    assert "100 bytes free, checkpoint 2 needs about" in info.value.strerror
    assert info.value.__notes__ == ["the last good checkpoint, step 1, is kept"]
    assert sorted(os.listdir(directory)) == ["1"]


def test_workdir_that_is_a_file_or_read_only(tmp_path):
  config = th.tiny_config(num_steps=1)
  afile = tmp_path / "afile"
  afile.write_text("x")
  with pytest.raises(ValueError, match="workdir '.*afile' is a file, not a directory"):
    loop.train(config, str(afile))
  with pytest.raises(ValueError, match="cannot be a directory: '.*afile' is a file"):
    loop.train(config, str(afile / "run"))
  read_only = tmp_path / "ro"
  read_only.mkdir()
  if os.geteuid() != 0:
    os.chmod(read_only, 0o555)
    want = errno.EACCES
  else:  # root writes anywhere: a read-only file system
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs",
                              str(read_only)], capture_output=True, check=False)
    if mounted.returncode:
      pytest.skip("cannot mount a read-only file system here")
    want = errno.EROFS
  try:
    with pytest.raises(OSError) as info:
      loop.train(config, str(read_only / "run"))
    assert info.value.errno == want
    assert info.value.filename == str(read_only / "run")
    assert "must be writable" in info.value.__notes__[0]
  finally:
    if os.geteuid() == 0:
      subprocess.run(["umount", str(read_only)], check=False)
    os.chmod(read_only, 0o755)


def test_closing_the_logs_on_a_full_disk_keeps_the_first_error(tmp_path):
  from jaxformer.training import metrics_logger  # pylint: disable=g-import-not-at-top

  class FullTensorBoard:
    def close(self):
      raise full_disk._enospc()  # pylint: disable=protected-access

  with full_disk.metrics_full(1):
    logger = metrics_logger.MetricsLogger(str(tmp_path), total_steps=2,
                                          tensorboard=False, progress=False)
  logger._tb = FullTensorBoard()  # pylint: disable=protected-access
  with pytest.raises(OSError) as info:
    logger.log_row({"step": 1, "x": 1.0})
  assert info.value.filename == str(tmp_path / "metrics.jsonl")
  logger.close()  # the write already failed and said so: nothing more to raise
  logger = metrics_logger.MetricsLogger(str(tmp_path), total_steps=2,
                                        tensorboard=False, progress=False)
  logger._tb = FullTensorBoard()  # pylint: disable=protected-access
  with pytest.raises(OSError) as info:
    logger.close()
  assert info.value.errno == errno.ENOSPC
  assert info.value.filename == str(tmp_path / "tensorboard")
