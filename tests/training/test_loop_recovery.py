"""The loop when things go wrong: a changed config on resume, a run killed before its
first checkpoint, a finished run rerun, a damaged checkpoint and metrics line, a
diverged run, Ctrl-C and SIGTERM during an async save, and a second run on the same
workdir."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from jaxformer.training import checkpoint as ckpt_lib
from jaxformer.training import divergence
from jaxformer.training import loop

import training_helpers as th


def _rows(workdir):
  def refuse(name):
    raise ValueError(f"not strict JSON: {name}")
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(l, parse_constant=refuse) for l in f if l.strip()]


def _steps(rows, key):
  return [r["step"] for r in rows if key in r]


def test_resume_refuses_trajectory_changes_and_records_allowed_ones(tmp_path):
  workdir = str(tmp_path)
  loop.train(th.tiny_config(num_steps=2), workdir)
  changed = th.tiny_config(num_steps=4)  # num_steps may change
  changed.optimizer.learning_rate = 0.111
  changed.train.seed = 1
  changed.data.update(dict(seq_len=8, batch_size=2))
  with pytest.raises(ValueError) as e:
    loop.train(changed, workdir)
  for line in ("optimizer.learning_rate: 0.001 -> 0.111", "train.seed: 0 -> 1",
               "data.seq_len: 16 -> 8", "data.batch_size: 4 -> 2"):
    assert line in str(e.value)
  assert "num_steps" not in str(e.value)
  allowed = th.tiny_config(num_steps=3, allow_config_changes=("optimizer.learning_rate",))
  allowed.optimizer.learning_rate = 5e-4
  loop.train(allowed, workdir)
  rows = _rows(workdir)
  assert {"step": 2, "config_changes": {"optimizer.learning_rate": {
      "old": 1e-3, "new": 5e-4}}} in rows
  assert _steps(rows, "loss") == [1, 2, 3]


@pytest.mark.slow
def test_each_step_once_after_kills_reruns_and_damage(tmp_path, capsys, caplog):
  workdir = str(tmp_path)
  config = th.tiny_config(num_steps=6, log_every=1, eval_every=3, checkpoint_every=4)

  def killed(step):
    if step == 3:
      raise RuntimeError("killed before the first checkpoint")
  with pytest.raises(RuntimeError, match="killed"):
    loop.train(config, workdir, should_stop=killed)
  assert _steps(_rows(workdir), "loss") == [1, 2, 3]
  summary = loop.train(config, workdir)  # starts again from step 0
  rows = _rows(workdir)
  assert _steps(rows, "loss") == [1, 2, 3, 4, 5, 6]
  assert _steps(rows, "eval_loss") == [3, 6]

  # A finished run, run again: says so and changes nothing.
  files = {n: open(os.path.join(workdir, n), "rb").read()
           for n in ("metrics.jsonl", "summary.json")}
  capsys.readouterr()
  assert loop.train(config, workdir) == json.loads(files["summary.json"])
  assert "nothing to do" in capsys.readouterr().out
  for name, content in files.items():
    assert open(os.path.join(workdir, name), "rb").read() == content, name
  assert json.loads(files["summary.json"])["loss"] == rows[-2]["loss"]

  # The newest checkpoint damaged and a partial metrics line: resume from the older
  # checkpoint, exactly (same losses), with the damaged one kept aside.
  shutil.rmtree(os.path.join(workdir, "checkpoints", "6", "state"))
  with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:
    f.write('{"step": 7, "lo')
  with caplog.at_level(logging.WARNING):
    again = loop.train(config, workdir)
  assert "resuming at step 4" in capsys.readouterr().out
  assert os.path.join(workdir, "checkpoints", "6") in caplog.text
  assert os.listdir(os.path.join(workdir, "checkpoints.damaged"))[0].startswith("6-")
  assert _same_but_timing(_rows(workdir), rows)
  assert again["eval_loss"] == summary["eval_loss"]


def _same_but_timing(a, b):
  drop = ("step_time_ms", "tokens_per_sec")
  return [{k: v for k, v in r.items() if k not in drop} for r in a] == [
      {k: v for k, v in r.items() if k not in drop} for r in b]


def test_diverged_run_stops_and_keeps_the_last_good_checkpoint(tmp_path):
  workdir = str(tmp_path)
  config = th.tiny_config(num_steps=40, log_every=1, checkpoint_every=4,
                          max_consecutive_skipped=3)
  config.optimizer.learning_rate = 1e3  # non-finite from step 7 on
  with pytest.raises(divergence.TrainingDivergedError) as e:
    loop.train(config, workdir)
  rows = _rows(workdir)  # strict JSON: NaN losses are null
  first_skip = next(r["step"] for r in rows if r.get("skipped"))
  assert rows[first_skip - 1]["loss"] is None
  last_finite = rows[first_skip - 2]
  assert f"up to step {first_skip + 2}" in str(e.value)
  assert f"last finite loss was {last_finite['loss']:.4g}" in str(e.value)
  steps = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints")).all_steps()
  assert steps and max(steps) < first_skip  # nothing saved after the divergence
  assert not os.path.exists(os.path.join(workdir, "summary.json"))


@pytest.mark.slow
def test_cli_second_run_refused_and_ctrl_c_during_async_saves(tmp_path):
  workdir = str(tmp_path / "run")
  args = ["-m", "experiments.train",
          "--config=experiments/configs/gpt_bytes.py:tiny", f"--workdir={workdir}",
          "--config.train.num_steps=100000", "--config.train.log_every=1",
          "--config.train.tensorboard=False", "--config.task_options.sample_tokens=0",
          "--config.train.eval_every=100000", "--config.train.checkpoint_every=1",
          "--config.sharding.cpu_devices=0"]
  env = dict(os.environ)
  env["PYTHONPATH"] = th.REPO_ROOT + os.pathsep + env.get("PYTHONPATH", "")
  first = subprocess.Popen([sys.executable, *args], cwd=th.REPO_ROOT, env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    metrics = os.path.join(workdir, "metrics.jsonl")
    deadline = time.time() + 180
    while time.time() < deadline and first.poll() is None:
      if os.path.exists(metrics) and len(_rows(workdir)) >= 3:
        break
      time.sleep(0.2)
    assert first.poll() is None, first.communicate()[1][-3000:]
    second = th.run_python([*args[:-1], "--config.optimizer.learning_rate=0.3"],
                           timeout=120)
    assert second.returncode != 0
    assert f"in use by another run (pid {first.pid} on host" in second.stderr
    first.send_signal(signal.SIGINT)  # Ctrl-C, with an async save in flight
    time.sleep(0.02)
    first.send_signal(signal.SIGTERM)  # and a scheduler's SIGTERM within 50 ms
    t0 = time.time()
    stdout, stderr = first.communicate(timeout=120)
  finally:
    if first.poll() is None:
      first.kill()
  assert first.returncode == 0, stderr[-3000:]
  assert "Traceback" not in stderr and "received signal 15 again" in stderr, stderr
  assert time.time() - t0 < 60 and "preempted" in stdout
  with open(os.path.join(workdir, "summary.json")) as f:
    summary = json.load(f)
  assert summary["preempted"]
  ck = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"))
  assert ck.latest_step() == summary["step"]
  assert _steps(_rows(workdir), "loss") == list(range(1, summary["step"] + 1))


if __name__ == "__main__":
  pytest.main([__file__])
