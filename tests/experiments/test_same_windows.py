"""experiments/benchmarks/same_windows.py: the windows are fixed and held out, ours is
scored against a float64 NumPy reference, nanoGPT's only where it fails (torch is not a
test dependency)."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from experiments.benchmarks import same_windows as sw
from jaxformer.data import local_text
from jaxformer.training import loop
from jaxformer.training.saved_run import load_run
from tests.experiments.test_gpt_text import _config


def test_common_windows_are_fixed_and_held_out():
  text = ("".join(chr(97 + (i * 7) % 26) for i in range(5000))).encode()
  tail = text[local_text._tail_start(text, 0.1):].decode()
  windows = sw.common_windows(text, count=50, length=65)
  assert windows == sw.common_windows(text, count=50, length=65)
  assert windows != sw.common_windows(text, count=50, length=65, seed=1)
  assert len(windows) == 50 and {len(w) for w in windows} == {65}
  assert all(w in tail for w in windows)
  # nanoGPT holds out text[int(0.9 n):], which contains our tail
  assert tail in text[int(0.9 * len(text)):].decode()
  with pytest.raises(ValueError, match="fewer than one window"):
    sw.common_windows(text[:300], count=1, length=65)


def test_score_ours_is_the_mean_next_character_loss(tmp_path):
  """A 2-step chars run scored on windows: against the float64 log-softmax of the
  same model's logits, over every predicted character, any batch size."""
  path = tmp_path / "book.txt"
  path.write_text("the quick brown fox jumps over the lazy dog. " * 40)
  workdir = str(tmp_path / "run")
  loop.train(_config(path, "chars", sample_tokens=0), workdir)
  windows = sw.common_windows(path.read_bytes(), count=6, length=17)
  got = sw.score_ours(workdir, windows, batch=4)
  assert got["step"] == 2
  run = load_run(workdir)
  ids = np.stack([run.tokenizer.encode_array(w) for w in windows])
  logits = np.asarray(run.model.apply({"params": run.params}, ids[:, :-1]), np.float64)
  logp = logits - logits.max(-1, keepdims=True)
  logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
  want = -np.take_along_axis(logp, ids[:, 1:, None], -1).mean()
  assert got["loss"] == pytest.approx(want, rel=1e-5)
  assert sw.score_ours(workdir, windows, batch=6)["loss"] == pytest.approx(want, rel=1e-5)


def test_score_nanogpt_failure_names_it(tmp_path):
  """Without a nanoGPT checkpoint (or torch) the scoring says so, with its error."""
  (tmp_path / "w.json").write_text("[]")
  with pytest.raises(RuntimeError, match="scoring nanoGPT's checkpoint failed"):
    sw.score_nanogpt(str(tmp_path), str(tmp_path / "w.json"), sys.executable)
