"""``gpt_text.py``: a GPT on a text file a user brings, with each tokenizer, resumed."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from experiments.configs import gpt_text
from jaxformer.training import checkpoint as ckpt_lib
from jaxformer.training import loop

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))))

TEXT = "".join(f"{i}: the {w} fox jumps over the lazy dog, said {n}.\n"
               for i, (w, n) in enumerate(zip(["quick", "slow", "red", "brown"] * 60,
                                              ["Ann", "Bob", "Cy"] * 80)))


def _config(path, tokenizer, **train):
  c = gpt_text.get_config("tiny")
  c.data.source_options.path = str(path)
  c.data.tokenizer = tokenizer
  c.data.vocab_size = 64
  c.model.update(dict(num_layers=1, embed_dim=16, max_len=16))
  c.model.block.update(dict(num_heads=2, mlp_dim=32))
  c.data.update(dict(seq_len=16, batch_size=4, eval_batch_size=4, prefetch=0))
  c.task_options.sample_tokens = train.pop("sample_tokens", 4)
  c.train.update({**dict(num_steps=2, log_every=1, eval_every=2, eval_batches=1,
                        checkpoint_every=2, progress=False, tensorboard=False,
                        async_checkpoint=False), **train})
  c.sharding.cpu_devices = 0
  return c


@pytest.mark.parametrize("tokenizer,want_vocab", [
    ("bytes", 263), ("chars", None), ("sentencepiece", 64)])
def test_trains_on_a_text_file_with_each_tokenizer_and_resumes(tmp_path, tokenizer,
                                                                 want_vocab):
  path = tmp_path / "book.txt"
  path.write_text(TEXT)
  workdir = str(tmp_path / "run")
  first = loop.train(_config(path, tokenizer), workdir)
  assert first["step"] == 2 and first["eval_loss"] > 0
  assert isinstance(first["sample"], str)
  ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"))
  vocab_size = ckpt.stored_config(2)["model"]["vocab_size"]  # from the tokenizer
  if tokenizer == "chars":
    assert vocab_size == 7 + len(set(TEXT[:int(len(TEXT) * 0.95)]))
  else:
    assert vocab_size == want_vocab
  files = os.listdir(os.path.join(workdir, "tokenizer")) if tokenizer != "bytes" else []
  assert len(files) == (0 if tokenizer == "bytes" else 1)
  # Resume on changed text: refused (the data's fingerprint) unless allowed; the
  # saved vocabulary is reused then.
  path.write_text(TEXT.upper())
  with pytest.raises(ValueError, match=r"the data changed since checkpoint 2 in .*: "
                     r".*book.txt: content changed \(same size\)"):
    loop.train(_config(path, tokenizer, num_steps=4, sample_tokens=0), workdir)
  allowed = _config(path, tokenizer, num_steps=4, sample_tokens=0,
                    allow_config_changes=("data",))
  if tokenizer == "chars":  # capitals: not in the vocabulary fitted on this text
    with pytest.raises(ValueError, match=r"characters \(\d+\.\d+%\) of the train and "
                       r"validation text are not in the run's character vocabulary"):
      loop.train(allowed, workdir)
    path.write_text(TEXT[::-1])  # the same characters, another text
  second = loop.train(allowed, workdir)
  assert second["step"] == 4
  assert ckpt.stored_config(4)["model"]["vocab_size"] == vocab_size
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    steps = [json.loads(line)["step"] for line in f if '"loss"' in line]
  assert steps == [1, 2, 3, 4]


def test_one_file_resumes_exactly_from_the_window_sampler_position(tmp_path):
  """One file (nanoGPT's random windows): interrupted at step 2 and resumed ==
  uninterrupted, step for step; the data state is the next batch's index."""
  path = tmp_path / "book.txt"
  path.write_text(TEXT)
  config = _config(path, "bytes", num_steps=4, eval_every=4, checkpoint_every=100,
                   sample_tokens=0)
  full, split = str(tmp_path / "full"), str(tmp_path / "split")
  a = loop.train(config, full)
  assert loop.train(config, split, should_stop=lambda step: step == 2)["preempted"]
  ckpt = ckpt_lib.Checkpointer(os.path.join(split, "checkpoints"))
  assert ckpt.latest_step() == 2
  b = loop.train(config, split)
  assert b["step"] == 4 and b["eval_loss"] == a["eval_loss"]

  def losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
      return [(r["step"], r["loss"]) for r in map(json.loads, f) if "loss" in r]
  assert losses(full) == losses(split) and len(losses(full)) == 4


def _cli(args, timeout=300):
  env = dict(os.environ, PYTHONPATH=REPO_ROOT, TF_CPP_MIN_LOG_LEVEL="3")
  return subprocess.run([sys.executable, *args], cwd=REPO_ROOT, env=env,
                        capture_output=True, text=True, timeout=timeout, check=False)


@pytest.mark.slow
def test_readme_command(tmp_path):
  (tmp_path / "a.txt").write_text(TEXT)
  (tmp_path / "b.txt").write_text(TEXT[::-1])
  workdir = str(tmp_path / "run")
  args = ["-m", "experiments.train", "--config=experiments/configs/gpt_text.py:tiny",
          f"--config.data.source_options.path={tmp_path}/*.txt", f"--workdir={workdir}",
          "--config.data.tokenizer=chars", "--config.train.num_steps=3",
          "--config.train.tensorboard=False", "--config.train.checkpoint_every=3",
          "--config.sharding.cpu_devices=0"]
  done = _cli(args, timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]
  again = _cli([a.replace("num_steps=3", "num_steps=5") for a in args])
  assert again.returncode == 0, again.stderr[-3000:]
  assert "resuming at step 3" in again.stdout
  missing = _cli([args[0], args[1], args[2], f"--workdir={workdir}x"])
  assert missing.returncode == 1
  assert "data.source_options.path is not set" in missing.stderr
  assert "Traceback" not in missing.stderr
  assert not os.path.exists(f"{workdir}x")
  typo = _cli([*args[:4], "--config.model.block.num_head=3"])
  assert typo.returncode == 1 and "Traceback" not in typo.stderr
  assert "unknown config field in an override: 'num_head'" in typo.stderr


def test_validation_names_data_path(tmp_path):
  config = _config(tmp_path / "book.txt", "chars")
  with pytest.raises(ValueError,
                     match=r"data.source_options.path=.*book\.txt.* matches no files"):
    loop.validate_config(config)
  config.data.source_options.path = None
  with pytest.raises(ValueError, match="data.source_options.path is not set"):
    loop.validate_config(config)
  config.data.source_options.path = str(tmp_path)
  (tmp_path / "a.txt").write_text(TEXT)
  loop.validate_config(config)
  config.data.source_options.validation_fraction = 0.0
  with pytest.raises(ValueError, match="data.source_options.validation_fraction=0.0"):
    loop.validate_config(config)
