"""experiments.prompt: a gpt_bytes run trained for a few steps, read back from its
workdir (jaxformer.training.saved_run), classifies a labelled file by prompting."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from flax import traverse_util

from experiments import prompt
from experiments.configs import gpt_bytes
from jaxformer.data import labelled
from jaxformer.training import finetune
from jaxformer.training import loop
from jaxformer.training import saved_run


@pytest.fixture(scope="module")
def gpt_run(tmp_path_factory):
  """gpt_bytes:tiny, shrunk, 3 steps: its workdir."""
  workdir = str(tmp_path_factory.mktemp("gpt_bytes"))
  c = gpt_bytes.get_config("tiny")
  c.model.update(dict(num_layers=1, embed_dim=16, max_len=64,
                      block=dict(num_heads=2, mlp_dim=32)))
  c.data.update(dict(batch_size=4, eval_batch_size=4, prefetch=0))
  c.train.update(dict(num_steps=3, log_every=1, eval_every=3, eval_batches=1,
                      checkpoint_every=3, progress=False, tensorboard=False,
                      async_checkpoint=False))
  loop.train(c, workdir)
  return workdir


@pytest.mark.slow  # the shared fixture trains for ~25 s
def test_load_run_restores_the_checkpoint(gpt_run):
  run = saved_run.load_run(gpt_run)
  assert run.step == 3 and run.model_config.max_len == 64
  assert run.tokenizer.vocab_size <= run.model_config.vocab_size
  want = traverse_util.flatten_dict(finetune.load_pretrained_params(gpt_run))
  got = traverse_util.flatten_dict(run.params)
  assert set(got) == set(want)
  for path, value in got.items():
    np.testing.assert_array_equal(value, want[path], err_msg=str(path))
  with pytest.raises(ValueError, match="no checkpoint"):
    saved_run.load_run(gpt_run + "/missing")


@pytest.mark.slow  # the shared fixture trains for ~25 s
def test_prompt_command_reports_accuracy(gpt_run, tmp_path):
  data = tmp_path / "labelled.jsonl"
  data.write_text("\n".join(json.dumps({"text": t, "label": i % 2})
                            for i, (t, _) in enumerate(labelled.SENTIMENT[:4])))
  out = subprocess.run(
      [sys.executable, "-m", "experiments.prompt", f"--workdir={gpt_run}",
       f"--data={data}", "--labels=bad,good", "--template=Text: {text}\\nIt was"],
      capture_output=True, text=True, timeout=300, check=True).stdout
  accuracy = float(out.split("accuracy ")[1].split()[0])
  assert 0.0 <= accuracy <= 1.0 and "on 4 examples | chance 0.5000" in out


@pytest.mark.slow  # the shared fixture trains for ~25 s
def test_evaluate_and_labels(gpt_run):
  loaded = prompt.load_model(gpt_run, None)
  texts, labels = map(list, zip(*labelled.SENTIMENT))
  result = prompt.evaluate(loaded, texts, labels)
  assert 0.0 <= result["accuracy"] <= 1.0
  assert (result["chance"], result["majority"], result["num_examples"]) == (0.5, 0.5, 12)
  assert prompt.parse_labels('{"0": " bad", "1": " good"}') == {"0": " bad", "1": " good"}
  assert prompt.parse_labels("neg, pos") == {"neg": " neg", "pos": " pos"}
  with pytest.raises(ValueError, match=">= 2"):
    prompt.parse_labels("only")
  with pytest.raises(ValueError, match="exactly one"):
    prompt.load_model(None, None)


def test_read_labelled(tmp_path):
  tsv = tmp_path / "a.tsv"
  tsv.write_text("good film\tpositive\n\nbad\tfilm\tnegative\n")
  assert labelled.read_labelled(tsv) == (["good film", "bad\tfilm"],
                                         ["positive", "negative"])
  tsv.write_text("no label here\n")
  with pytest.raises(ValueError, match=r"a.tsv:1"):
    labelled.read_labelled(tsv)
  bad = tmp_path / "b.jsonl"
  bad.write_text('{"text": "x"}\n')
  with pytest.raises(ValueError, match=r"b.jsonl:1.*'label'"):
    labelled.read_labelled(bad)
  empty = tmp_path / "c.jsonl"
  empty.write_text("\n")
  with pytest.raises(ValueError, match="no labelled"):
    labelled.read_labelled(empty)


def test_prompt_with_a_hugging_face_directory():
  """--pretrained: the tiny random GPT-2 fixture and its BPE tokenizer."""
  fixture = os.path.join(os.path.dirname(__file__), "..", "pretrained", "fixtures",
                         "gpt2_lm")
  loaded = prompt.load_model(None, fixture)
  texts, labels = map(list, zip(*labelled.SENTIMENT[:4]))
  result = prompt.evaluate(loaded, texts, labels, verbalizer={
      "negative": " bad", "positive": " good"})
  assert 0.0 <= result["accuracy"] <= 1.0 and result["num_examples"] == 4
