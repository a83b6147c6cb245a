"""The loop end to end on the real GPT + embedded data: exact resume through real
checkpoint files, metrics files, config mismatch, validation, and the CLI's SIGTERM
handling."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import chex
import jax
import numpy as np
import pytest

from jaxformer.training import checkpoint as ckpt_lib
from jaxformer.training import loop

import training_helpers as th


def _rows(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(l) for l in f if l.strip()]


def _final_state(workdir, step):
  """The raw checkpointed arrays at ``step`` (no target: plain numpy trees)."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  mngr = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"),
                               item_names=("state", "data", "config"))
  out = mngr.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(), data=ocp.args.JsonRestore()))
  mngr.close()
  return jax.device_get(out["state"]), out["data"]


def test_exact_resume_bit_for_bit(tmp_path):
  """Interrupted after step 3 and resumed == uninterrupted: same per-step losses,
  same final parameters, optimizer state and data position (CPU, float32, exact)."""
  config = th.tiny_config(num_steps=6, log_every=1, eval_every=6)
  full = str(tmp_path / "full")
  split = str(tmp_path / "split")
  a = loop.train(config, full)
  b1 = loop.train(config, split, should_stop=lambda step: step == 3)
  assert b1["preempted"] and b1["step"] == 3
  assert ckpt_lib.Checkpointer(os.path.join(split, "checkpoints")).latest_step() == 3
  b2 = loop.train(config, split)
  assert not b2["preempted"] and b2["step"] == 6
  assert a["eval_loss"] == b2["eval_loss"]
  losses_a = [(r["step"], r["loss"]) for r in _rows(full) if "loss" in r]
  losses_b = [(r["step"], r["loss"]) for r in _rows(split) if "loss" in r]
  assert [s for s, _ in losses_a] == [1, 2, 3, 4, 5, 6]
  assert losses_a == losses_b  # rows after the checkpoint are not duplicated
  state_a, data_a = _final_state(full, 6)
  state_b, data_b = _final_state(split, 6)
  chex.assert_trees_all_equal(state_a, state_b)
  assert data_a == data_b


def test_metrics_files_summary_and_sample(tmp_path):
  config = th.tiny_config(num_steps=4, log_every=2, eval_every=2, sample_tokens=5,
                          tensorboard=True)
  summary = loop.train(config, str(tmp_path))
  rows = _rows(tmp_path)
  train_rows = [r for r in rows if "loss" in r]
  eval_rows = [r for r in rows if "eval_loss" in r]
  assert [r["step"] for r in train_rows] == [2, 4]
  assert [r["step"] for r in eval_rows] == [2, 4]
  for r in train_rows:
    assert {"grad_norm", "learning_rate", "tokens_per_sec", "step_time_ms"} <= set(r)
    assert "mfu" not in r  # CPU: peak FLOP/s unknown
  for r in eval_rows:
    # byte-level tokens: bits per byte = nats per token / ln 2
    np.testing.assert_allclose(r["eval_bits_per_byte"], r["eval_nll"] / np.log(2),
                               rtol=1e-6)
    # the unigram baseline is logged beside it, the same at every eval
    assert r["eval_unigram_bits_per_byte"] == eval_rows[0]["eval_unigram_bits_per_byte"]
    assert 0.0 < r["eval_unigram_bits_per_byte"] < 8.0
  assert summary["eval_loss"] == eval_rows[-1]["eval_loss"]
  assert summary["step"] == 4 and summary["skipped_steps"] == 0
  assert isinstance(summary["sample"], str) and summary["sample"].startswith("def ")
  with open(tmp_path / "summary.json") as f:
    assert json.load(f)["step"] == 4
  assert any(n.startswith("events") for n in os.listdir(tmp_path / "tensorboard"))
  assert ckpt_lib.Checkpointer(str(tmp_path / "checkpoints")).latest_step() == 4


def test_unigram_bits_matches_numpy_entropy():
  from jaxformer.tasks import causal_lm  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  batches = [dict(targets=rng.integers(0, 5, (2, 7)),
                  weights=(rng.random((2, 7)) > 0.3).astype(np.float32))
             for _ in range(3)]
  t = np.concatenate([b["targets"].ravel() for b in batches])
  w = np.concatenate([b["weights"].ravel() for b in batches]).astype(np.float64)
  p = np.array([w[t == k].sum() for k in range(5)]) / w.sum()
  p = p[p > 0]
  np.testing.assert_allclose(causal_lm.unigram_bits(batches), -(p * np.log2(p)).sum(),
                             rtol=1e-12)
  uniform = [dict(targets=np.arange(8).reshape(1, 8), weights=np.ones((1, 8)))]
  np.testing.assert_allclose(causal_lm.unigram_bits(uniform), 3.0, rtol=1e-12)


def test_changed_model_config_is_rejected(tmp_path):
  config = th.tiny_config(num_steps=1)
  loop.train(config, str(tmp_path))
  config.model.block.num_heads = 4
  config.train.num_steps = 4  # not a model field: allowed to change
  with pytest.raises(ValueError, match=r"model\.block\.num_heads: 2 -> 4"):
    loop.train(config, str(tmp_path))


@pytest.mark.parametrize("section,field,value,match", [
    ("train", "num_steps", 0, r"train\.num_steps=0"),
    ("data", "seq_len", 64, r"data\.seq_len=64 exceeds model\.max_len=16"),
    ("train", "log_every", -1, r"train\.log_every"),
    ("train", "keep_checkpoints", 0, r"train\.keep_checkpoints=0"),
    ("data", "eval_batch_size", 0, r"data\.eval_batch_size=0"),
    ("sharding", "mesh_shape", (2, 2), r"sharding\.mesh_shape=\(2, 2\)"),
    ("data", "tokenizer", "words", r"data\.tokenizer='words'"),
    ("data", "source", "nope", r"data\.source='nope'"),
])
def test_validate_config(section, field, value, match):
  config = th.tiny_config()
  config[section][field] = value
  with pytest.raises(ValueError, match=match):
    loop.validate_config(config)


def test_unknown_task_and_model_field():
  config = th.tiny_config()
  config.task = "nope"
  with pytest.raises(ValueError, match="task='nope'"):
    loop.validate_config(config)
  config = th.tiny_config()
  config.model.block.num_heads = 0
  with pytest.raises(ValueError, match=r"model\.block\.num_heads=0"):
    loop.validate_config(config)
  config = th.tiny_config()
  config.model.name = "bert2"
  with pytest.raises(ValueError, match="model.name='bert2'"):
    loop.validate_config(config)


def test_invalid_config_creates_no_workdir(tmp_path):
  config = th.tiny_config()
  config.data.eval_batch_size = 0
  with pytest.raises(ValueError, match="data.eval_batch_size"):
    loop.train(config, str(tmp_path / "never"))
  assert not os.path.exists(tmp_path / "never")


@pytest.mark.slow
def test_cli_sigterm_saves_and_exits_then_resumes(tmp_path):
  workdir = str(tmp_path / "run")
  args = ["-m", "experiments.train",
          "--config=experiments/configs/gpt_bytes.py:tiny", f"--workdir={workdir}",
          "--config.train.num_steps=100000", "--config.train.log_every=1",
          "--config.train.tensorboard=False", "--config.task_options.sample_tokens=0",
          "--config.train.eval_every=100000", "--config.train.checkpoint_every=100000"]
  env = dict(os.environ)
  env["PYTHONPATH"] = th.REPO_ROOT + os.pathsep + env.get("PYTHONPATH", "")
  proc = subprocess.Popen([sys.executable, *args], cwd=th.REPO_ROOT, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  metrics = os.path.join(workdir, "metrics.jsonl")
  deadline = time.time() + 180
  while time.time() < deadline and proc.poll() is None:
    if os.path.exists(metrics) and len(_rows(workdir)) >= 3:
      break
    time.sleep(0.2)
  assert proc.poll() is None, proc.communicate()[1][-3000:]
  proc.send_signal(signal.SIGTERM)
  stdout, stderr = proc.communicate(timeout=120)
  assert proc.returncode == 0, stderr[-3000:]
  assert "preempted" in stdout
  with open(os.path.join(workdir, "summary.json")) as f:
    summary = json.load(f)
  assert summary["preempted"] and 3 <= summary["step"] < 100000
  ck = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"))
  assert ck.latest_step() == summary["step"]
  # rerunning the same command resumes from there
  done = th.run_python([*args[:4], f"--config.train.num_steps={summary['step'] + 2}",
                        *args[5:]], timeout=180)
  assert done.returncode == 0, done.stderr[-3000:]
  assert f"resuming at step {summary['step']}" in done.stdout
  # The header line names the data source and both splits.
  assert re.search(r"\| data '\w+'.*\(train split '[^']+', eval split '[^']+'\) \|",
                   done.stdout), done.stdout[:2000]


if __name__ == "__main__":
  pytest.main([__file__])
