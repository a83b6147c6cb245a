"""The notebooks (jupytext percent-format ``.py`` files in ``experiments/notebooks/``).

Fast tests: every notebook converts to ``.ipynb`` and follows the conventions (tiny by
default, ``FULL`` flag, outputs under ``OUT_DIR``); the shared helpers behave.
Slow tests (``-m slow``): every notebook runs at its tiny size in a subprocess and
writes its figures and tables; the attention implementations give the same curves.
"""

from __future__ import annotations

import csv
import os
import pathlib
import subprocess
import sys

import jupytext
import pytest

from experiments.configs import gpt_bytes
from experiments.notebooks import build_ipynb
from experiments.notebooks import common

REPO = pathlib.Path(__file__).resolve().parents[2]

# Files each notebook must write into OUT_DIR (besides runs/).
EXPECTED = {
    "ablation_architecture": [
        "norm.png", "norm.md", "positions.png", "positions.md", "attention_beta.png",
        "attention_beta.md", "attention_curves.png", "implementations.png",
        "implementations.md", "results.md", "results.csv"],
    "ablation_bert": ["nsp.png", "nsp.md", "mask_rate.png", "mask_rate.md",
                      "mask_rate_curves.png", "results.md", "results.csv"],
    "ablation_axial": ["memory.png", "memory.md", "generative.png", "generative.md",
                       "classification.png", "classification.md", "step_time.png",
                       "results.md", "results.csv"],
    "attention_pictures": ["gpt_heads.png", "vit_rollout.png", "axial_pixel.png",
                           "axial_heads.png", "results.md", "results.csv"],
}


def _read_csv(path: pathlib.Path) -> list[dict[str, str]]:
  with open(path, encoding="utf-8", newline="") as f:
    return list(csv.DictReader(f))


def test_every_notebook_is_listed():
  assert sorted(p.stem for p in build_ipynb.notebook_paths()) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_notebook_converts_and_follows_the_conventions(name):
  path = REPO / "experiments" / "notebooks" / f"{name}.py"
  notebook = jupytext.read(path)
  kinds = [cell.cell_type for cell in notebook.cells]
  assert kinds[0] == "markdown" and kinds.count("code") >= 2, kinds
  source = path.read_text(encoding="utf-8")
  assert 'FULL = os.environ.get("FULL") == "1"' in source
  assert f'common.out_dir("{name}")' in source
  # Training goes through the library's loop (common.train_run), not a local copy.
  assert "common.train_run(" in source
  assert "optax" not in source and "value_and_grad" not in source


def test_build_ipynb_writes_notebooks(tmp_path):
  written = build_ipynb.build(tmp_path, ["attention_pictures"])
  assert [p.name for p in written] == ["attention_pictures.ipynb"]
  notebook = jupytext.read(written[0])
  assert any("analysis.vit_rollout" in c.source for c in notebook.cells)
  with pytest.raises(ValueError, match="unknown notebooks"):
    build_ipynb.build(tmp_path, ["nope"])


def test_out_dir_follows_the_environment(tmp_path, monkeypatch):
  monkeypatch.setenv("OUT_DIR", str(tmp_path / "x"))
  assert common.out_dir("any") == tmp_path / "x"
  assert (tmp_path / "x").is_dir()
  monkeypatch.delenv("OUT_DIR")
  assert common.out_dir("any") == REPO / "experiments" / "notebooks" / "out" / "any"


def test_with_overrides_copies_and_checks_sections():
  base = gpt_bytes.get_config("tiny")
  changed = common.with_overrides(base, {"model.norm": "post",
                                         "train.num_steps": 7})
  assert changed.model.norm == "post" and changed.train.num_steps == 7
  assert "norm" not in base.model and base.train.num_steps == 20
  with pytest.raises(ValueError, match="no section 'modle'"):
    common.with_overrides(base, {"modle.norm": "post"})


def test_with_overrides_keeps_field_references():
  from experiments.configs import bert_mlm  # pylint: disable=g-import-not-at-top
  changed = common.with_overrides(bert_mlm.get_config("tiny"), {"task_options.nsp": True})
  assert changed.model.nsp_head is True


def test_notebook_settings_are_quiet_and_synchronous():
  config = common.notebook_settings(gpt_bytes.get_config("tiny"))
  assert config.train.progress is False and config.train.tensorboard is False
  assert config.train.async_checkpoint is False and config.train.sample_tokens == 0
  assert config.train.checkpoint_every == config.train.num_steps


def test_final_train_loss_averages_the_last_rows(tmp_path):
  with open(tmp_path / "metrics.jsonl", "w", encoding="utf-8") as f:
    for step, loss in ((1, 9.0), (2, 3.0), (3, 2.0), (4, 1.0)):
      f.write(f'{{"step": {step}, "loss": {loss}}}\n')
    f.write('{"step": 4, "eval_loss": 5.0}\n')
  assert common.final_train_loss(tmp_path) == pytest.approx(2.0)
  assert common.final_train_loss(tmp_path, last=1) == pytest.approx(1.0)


def test_load_params_needs_a_checkpoint(tmp_path):
  with pytest.raises(ValueError, match="no checkpoint"):
    common.load_params(tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_notebook_runs_at_tiny_size(name, tmp_path):
  env = {**os.environ, "OUT_DIR": str(tmp_path), "FULL": "0",
         "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
  env.pop("XLA_FLAGS", None)
  result = subprocess.run(
      [sys.executable, str(REPO / "experiments" / "notebooks" / f"{name}.py")],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=900, check=False)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
  for filename in EXPECTED[name]:
    path = tmp_path / filename
    assert path.is_file() and path.stat().st_size > 0, f"{name} did not write {filename}"
    if filename.endswith(".png"):
      assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if filename.endswith(".md"):
      lines = path.read_text(encoding="utf-8").splitlines()
      assert len(lines) >= 3 and lines[1].startswith("|---"), lines
  rows = _read_csv(tmp_path / "results.csv")
  assert rows, "empty results table"
  if name == "ablation_architecture":
    # xla / chunked / pallas (interpret) train to the same curves.
    impl_rows = _read_csv(tmp_path / "implementations.csv")
    assert [r["impl"] for r in impl_rows] == ["xla", "chunked", "pallas"]
    assert max(float(r["max_abs_loss_diff_vs_xla"]) for r in impl_rows) < 1e-3
    losses = {r["run"]: float(r["eval_loss"]) for r in rows}
    assert all(0.0 < v < 4.5 for v in losses.values()), losses   # ln(263) = 5.57 at init
