"""Context parallelism end to end: the tiny byte-level GPT trained through the CLI on 4
CPU devices with its sequences split over the ``context`` mesh axis (one subprocess
runs every training; see context_parallel_worker.py)."""

from __future__ import annotations

import json

import pytest

import training_helpers as th


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  root = tmp_path_factory.mktemp("context_parallel")
  proc = th.run_python(["tests/training/context_parallel_worker.py", str(root)],
                       timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")][-1]
  return json.loads(line[len("RESULT "):])


@pytest.mark.slow
@pytest.mark.parametrize("name", ["context4", "context4_all_gather", "data2_context2",
                                  "fsdp2_context2"])
def test_same_losses_as_data_parallel(runs, name):
  """20 steps: every step's loss within 1e-4 of the (4,1,1,1) data-parallel run (the
  same batches; float32, only the reduction order differs)."""
  assert runs["devices"] == 4
  want = runs["data4"]["losses"]
  got = runs[name]["losses"]
  assert sorted(got, key=int) == [str(s) for s in range(1, 21)]
  for step, loss in want.items():
    assert abs(got[step] - loss) <= 1e-4, (name, step, got[step], loss)
  assert want["20"] < want["1"]


@pytest.mark.slow
def test_resume_is_exact(runs):
  """The (1,1,1,4) run resumed from its step-10 checkpoint repeats steps 11-20 bit for
  bit."""
  got = runs["context4_resumed"]["losses"]
  assert sorted(got, key=int) == [str(s) for s in range(11, 21)]
  for step, loss in got.items():
    assert loss == runs["context4"]["losses"][step], step


@pytest.mark.slow
def test_generation_after_context_parallel_training(runs):
  """The run's sample (KV-cache decoding, unsharded on length) is produced, and it is
  the one the data-parallel run's identical parameters give."""
  sample = runs["context4"]["sample"]
  assert isinstance(sample, str) and sample.startswith("def ")
  assert sample == runs["data4"]["sample"]
