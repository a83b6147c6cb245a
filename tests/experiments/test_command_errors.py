"""The one-line error contract of experiments.prompt, sample and perplexity (shared with
experiments.train through experiments.command_line): a bad input ends in one
``error:`` line naming it and exit status 1; ``--verbose`` adds the traceback."""

from __future__ import annotations

import errno
import glob
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from experiments import command_line
from experiments import perplexity as perplexity_lib
from experiments import prompt
from experiments import sample as sample_lib
from jaxformer.data import labelled
from jaxformer.data import local_text
from jaxformer.training import checkpoint as ckpt_lib
from jaxformer.training import saved_run

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FIXTURES = os.path.join(REPO, "tests", "pretrained", "fixtures")
GPT2, BERT = os.path.join(FIXTURES, "gpt2_lm"), os.path.join(FIXTURES, "bert_mlm")


def _fake_run(workdir: str, model: dict) -> str:
  """A workdir with one real checkpoint (orbax, as the loop writes it) of a stand-in
  state: what load_run reads, without training."""
  config = {"model": model, "data": {"tokenizer": "bytes"}}
  with ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"),
                             async_save=False) as checkpointer:
    checkpointer.save(2, {"params": {"x": np.arange(3, dtype=np.float32)}},
                      config=config, force=True)
  return workdir


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  root = tmp_path_factory.mktemp("runs")
  gpt = dict(name="gpt", vocab_size=None, num_layers=1, embed_dim=16, max_len=16,
             block=dict(num_heads=2, mlp_dim=32))
  out = {"gpt": _fake_run(str(root / "gpt"), gpt),
         "bert": _fake_run(str(root / "bert"), dict(name="bert", num_layers=1)),
         "empty": str(root / "empty"), "file": str(root / "file")}
  os.makedirs(out["empty"])
  with open(out["file"], "w", encoding="utf-8") as f:
    f.write("not a run")
  out["damaged"] = str(root / "damaged")
  shutil.copytree(out["gpt"], out["damaged"])
  for path in glob.glob(os.path.join(out["damaged"], "checkpoints", "2", "state", "**",
                                     "d", "*"), recursive=True):
    with open(path, "r+b") as f:  # keep the size, zero the payload
      size = len(f.read())
      f.seek(16)
      f.write(bytes(size - 16))
  binary = root / "binary.jsonl"
  binary.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)))
  out["binary"] = str(binary)
  return out


def test_saved_runs_that_cannot_be_prompted_are_named(runs):
  assert saved_run.load_run(runs["gpt"]).params["x"].tolist() == [0.0, 1.0, 2.0]
  with pytest.raises(ValueError, match=r"--workdir='.*empty' has no checkpoint under "
                     r".*give the workdir of a training run") as info:
    prompt.load_model(runs["empty"], None)
  assert "finetune" not in str(info.value)  # a field the user never passed
  with pytest.raises(ValueError, match="is a file, not a training run's directory"):
    prompt.load_model(runs["file"], None)
  with pytest.raises(ValueError, match=r"--step=5 is not a checkpoint .* it has \[2\]"):
    prompt.load_model(runs["gpt"], None, step=5)
  with pytest.raises(ValueError, match=r"prompting .*bert needs a causal LM \(a GPT "
                     r"model\), found a 'bert' run"):
    prompt.load_model(runs["bert"], None)
  with pytest.raises(ValueError, match=r"checkpoint .*damaged.checkpoints.2 is damaged "
                     r"and does not restore \(.*\); give another --step, or train again"):
    prompt.load_model(runs["damaged"], None)


def test_pretrained_bert_is_refused_by_every_command():
  found = r"needs a causal LM \(a GPT model\), found BertForMaskedLM \(bert\)"
  with pytest.raises(ValueError, match="prompting .*bert_mlm " + found):
    prompt.load_model(None, BERT)
  with pytest.raises(ValueError, match="sampling from .*bert_mlm " + found):
    sample_lib.sample(BERT, "hi")
  with pytest.raises(ValueError, match="perplexity under .*bert_mlm " + found):
    perplexity_lib.perplexity(BERT, "hi there")
  with pytest.raises(ValueError, match="--max_new_tokens=0 must be >= 1"):
    sample_lib.sample(GPT2, "hi", max_new_tokens=0)


def test_text_that_is_not_utf8_is_named_with_its_offset(runs, tmp_path):
  latin1 = tmp_path / "latin1.tsv"
  latin1.write_bytes("café\tpositive\nnaïve\tnegative\n".encode("latin-1"))
  with pytest.raises(ValueError, match=r"latin1.tsv is not utf-8 text: byte 0xe9 at "
                     r"offset 3 \(invalid continuation byte\); save it as UTF-8"):
    labelled.read_labelled(latin1)
  with pytest.raises(ValueError, match=r"binary.jsonl is not utf-8 text: byte 0x89 at "
                     r"offset 0 .*; it looks binary"):
    labelled.read_labelled(runs["binary"])
  assert local_text.read_text(latin1, encoding="latin-1").startswith("café")
  crlf = tmp_path / "crlf.tsv"  # lines as a text-mode read gave them
  crlf.write_bytes(b"good\tpositive\r\nbad\tnegative\r\n")
  assert labelled.read_labelled(crlf) == (["good", "bad"], ["positive", "negative"])


def test_labels_that_are_not_json_name_the_flag():
  with pytest.raises(ValueError, match=r"--labels='\{\"0\":' is not a JSON object"):
    prompt.parse_labels('{"0": ')
  with pytest.raises(ValueError, match="must map >= 2 labels"):
    prompt.parse_labels('{"0": " bad"}')


def test_one_line_of_an_os_error_names_errno_and_path():
  full = OSError(errno.ENOSPC, "No space left on device", "/runs/a/metrics.jsonl")
  assert command_line.one_line(full) == (
      "No space left on device (ENOSPC): /runs/a/metrics.jsonl")
  assert command_line.one_line(ValueError("fields differ:\n  a: 1 != 2\n  b\nUse x.")
                               ) == "fields differ: a: 1 != 2; b; Use x."


def test_commands_end_in_one_error_line(runs):
  """The real processes, started together (their imports overlap)."""
  cases = {
      "prompt_bert_run": (["experiments.prompt", f"--workdir={runs['bert']}"],
                          "needs a causal LM (a GPT model), found a 'bert' run"),
      "sample_bert": (["experiments.sample", f"--pretrained={BERT}", "--prompt=hi"],
                      "needs a causal LM (a GPT model), found BertForMaskedLM (bert)"),
      "perplexity_verbose": (["experiments.perplexity", f"--pretrained={GPT2}",
                              f"--text={runs['binary']}", "--verbose"],
                             "binary.jsonl is not utf-8 text: byte 0x89 at offset 0"),
  }
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  procs = {name: subprocess.Popen([sys.executable, "-m", *args], cwd=REPO, env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True) for name, (args, _) in cases.items()}
  for name, proc in procs.items():
    _, stderr = proc.communicate(timeout=300)
    lines = stderr.strip().splitlines()
    assert proc.returncode == 1, (name, stderr[-3000:])
    assert lines[-1].startswith("error: ") and cases[name][1] in lines[-1], (name, stderr)
    verbose = name.endswith("verbose")
    assert ("Traceback" in stderr) == verbose, (name, stderr)
    assert lines[-1].endswith("(--verbose: traceback)") != verbose, (name, stderr)
    if not verbose:  # nothing but warnings (orbax reading read-only) and the line
      assert all(x[:1] == "W" for x in lines[:-1]), (name, stderr)
