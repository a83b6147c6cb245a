"""Checks that run before anything is lost: a device layout that cannot hold the batch
(before the workdir exists), a text too small to evaluate (before step 1), data that
changed under a resumed run (its fingerprint: tests/experiments/test_gpt_text.py); a
resume on another device count is in test_faults.py (it shares that run)."""

from __future__ import annotations

import functools
import os

import pytest

from jaxformer.training import loop

import training_helpers as th


def test_mesh_and_batch_errors_come_before_the_workdir(tmp_path):
  workdir = str(tmp_path / "run")
  config = th.tiny_config()
  config.sharding.mesh_shape = (4, 1, 1)  # the test process has fewer devices
  with pytest.raises(ValueError, match=r"mesh_shape"):
    loop.train(config, workdir)
  assert not os.path.exists(workdir)


@pytest.mark.slow  # a process of its own, for 2 CPU devices (no compilation)
def test_batch_that_devices_cannot_split_fails_before_the_workdir(tmp_path):
  workdir = str(tmp_path / "run")
  proc = th.run_python(["-m", "experiments.train",
                        "--config=experiments/configs/gpt_bytes.py:tiny",
                        f"--workdir={workdir}", "--config.sharding.cpu_devices=2",
                        "--config.data.batch_size=5"], timeout=300)
  assert proc.returncode == 1, proc.stderr[-3000:]
  assert proc.stderr.strip().splitlines()[-1].startswith(
      "error: data.batch_size=5 must be divisible by the process count (1) and by the "
      "mesh's data x fsdp size (2; sharding.mesh_shape)"), proc.stderr[-3000:]
  assert not os.path.exists(workdir)


def _text_config(path, **train):
  from experiments.configs import gpt_text  # pylint: disable=g-import-not-at-top
  c = gpt_text.get_config("tiny")
  c.data.source_options.path = str(path)
  c.model.update(dict(num_layers=1, embed_dim=16, max_len=16))
  c.model.block.update(dict(num_heads=2, mlp_dim=32))
  c.data.update(dict(seq_len=16, batch_size=4, eval_batch_size=4, prefetch=0))
  c.task_options.sample_tokens = 0
  c.train.update({**dict(num_steps=10, log_every=5, eval_every=10, eval_batches=1,
                        checkpoint_every=5, progress=False, tensorboard=False,
                        async_checkpoint=False), **train})
  c.sharding.cpu_devices = 0
  return c


@pytest.mark.parametrize("text,want", [
    ("x", r"1 byte\(s\) split .* leave 1 bytes to train on and 0 to validate on"),
    ("hello world!", r"12 byte\(s\) split .* leave 11 bytes to train on and 1 to "
                     r"validate on; it needs at least 17 bytes \(one window")])
def test_text_too_small_to_evaluate_fails_before_the_workdir(tmp_path, text, want):
  path = tmp_path / "tiny.txt"
  path.write_text(text)
  workdir = str(tmp_path / "run")
  with pytest.raises(ValueError, match=want):
    loop.train(_text_config(path), workdir)
  assert not os.path.exists(workdir)


def test_the_validation_split_is_read_before_step_1(tmp_path, monkeypatch):
  from jaxformer.data import local_text  # pylint: disable=g-import-not-at-top
  path = tmp_path / "book.txt"
  path.write_text("the quick brown fox jumps over the lazy dog. " * 10)
  real = local_text.text_split_source

  @functools.wraps(real)  # (the options are checked against its signature)
  def no_validation(split, **options):
    if split == "validation":
      raise ValueError("no validation text (simulated)")
    return real(split, **options)
  monkeypatch.setitem(__import__("jaxformer.data.sources", fromlist=["SOURCES"]).SOURCES,
                      "text_files", no_validation)
  workdir = str(tmp_path / "run")
  with pytest.raises(ValueError, match="no validation text"):
    loop.train(_text_config(path), workdir)
  assert not os.path.exists(os.path.join(workdir, "metrics.jsonl"))  # no step ran

