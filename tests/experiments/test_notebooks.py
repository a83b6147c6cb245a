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
        "implementations.md", "results.md", "results.csv", "summary.md"],
    "ablation_bert": ["nsp.png", "nsp.md", "nsp_downstream.png", "mask_rate.png",
                      "mask_rate.md", "mask_rate_downstream.png", "mask_rate_curves.png",
                      "replacement.png", "replacement.md", "results.md", "results.csv"],
    "ablation_finetune": ["pretraining.md", "init.png", "init.md", "init_per_pooling.md",
                          "pooling.png",
                          "pooling.md", "results.md", "results.csv"],
    "ablation_axial": ["memory.png", "memory.md", "generative.png", "generative.md",
                       "classification.png", "classification.md", "step_time.png",
                       "results.md", "results.csv"],
    "attention_pictures": ["gpt_heads.png", "vit_rollout.png", "axial_pixel.png",
                           "embedding_kinds.md",
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
  assert "SIZE = common.size()" in source        # tiny | cpu | full
  assert f'common.out_dir("{name}")' in source
  assert f'common.runs_dir("{name}")' in source  # workdirs apart from the outputs
  # Training goes through the library's loop (common.train_run / train_seeds), not a
  # local copy.
  assert "common.train_run(" in source or "common.train_seeds(" in source
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


def test_size_reads_the_environment(monkeypatch):
  monkeypatch.delenv("FULL", raising=False)
  monkeypatch.delenv("NOTEBOOK_SIZE", raising=False)
  assert common.size() == "tiny"
  monkeypatch.setenv("NOTEBOOK_SIZE", "cpu")
  assert common.size() == "cpu" and len(common.SEEDS["cpu"]) == 3
  monkeypatch.setenv("FULL", "1")
  assert common.size() == "full"
  monkeypatch.setenv("FULL", "0")
  monkeypatch.setenv("NOTEBOOK_SIZE", "huge")
  with pytest.raises(ValueError, match="NOTEBOOK_SIZE='huge'"):
    common.size()


def test_runs_dir_is_apart_from_the_outputs(tmp_path, monkeypatch):
  monkeypatch.setenv("OUT_DIR", str(tmp_path / "out"))
  monkeypatch.delenv("RUNS_DIR", raising=False)
  assert common.runs_dir("nb") == tmp_path / "out" / "runs"
  monkeypatch.setenv("RUNS_DIR", str(tmp_path / "runs"))
  assert common.runs_dir("nb") == tmp_path / "runs" / "nb"
  assert (tmp_path / "runs" / "nb").is_dir()


def test_train_seeds_runs_each_seed_in_its_own_workdir(tmp_path, monkeypatch):
  calls = []

  def fake_train_run(config, workdir, *, overrides=None):
    calls.append((config, pathlib.Path(workdir), dict(overrides)))
    return {"workdir": str(workdir)}

  monkeypatch.setattr(common, "train_run", fake_train_run)
  config = gpt_bytes.get_config("tiny")
  summaries = common.train_seeds(config, tmp_path, "arm", (0, 1),
                                 overrides={"model.block.norm": "post"})
  assert [s["seed"] for s in summaries] == [0, 1]
  assert [c[1] for c in calls] == [tmp_path / "arm" / "s0", tmp_path / "arm" / "s1"]
  assert [c[2] for c in calls] == [{"model.block.norm": "post", "train.seed": 0},
                                   {"model.block.norm": "post", "train.seed": 1}]
  assert all(c[0] is config for c in calls)


def test_build_ipynb_executes_into_out_dir(tmp_path, monkeypatch):
  # Executing writes <out>/<name>.ipynb with outputs, and the notebook's tables into
  # <out>/<name>/ while its workdirs go to runs_dir (checked on a stand-in notebook).
  source = (
      "# ---\n# jupyter:\n#   jupytext:\n#     text_representation:\n"
      "#       format_name: percent\n# ---\n\n# %% [markdown]\n# # t\n\n# %%\n"
      "import os, pathlib\n"
      "out = pathlib.Path(os.environ['OUT_DIR']); out.mkdir(parents=True)\n"
      "(out / 't.md').write_text(os.environ['NOTEBOOK_SIZE'])\n"
      "pathlib.Path(os.environ['RUNS_DIR']).mkdir(parents=True)\n"
      "print('size', os.environ['NOTEBOOK_SIZE'])\n")
  (tmp_path / "nbs").mkdir()
  (tmp_path / "nbs" / "stand_in.py").write_text(source, encoding="utf-8")
  monkeypatch.setattr(build_ipynb, "NOTEBOOK_DIR", tmp_path / "nbs")
  written = build_ipynb.build(tmp_path / "res", execute=True, size="cpu",
                              runs_dir=tmp_path / "runs")
  assert written == [tmp_path / "res" / "stand_in.ipynb"]
  outputs = [o for c in jupytext.read(written[0]).cells for o in c.get("outputs", [])]
  assert any("size cpu" in o.get("text", "") for o in outputs), outputs
  assert (tmp_path / "res" / "stand_in" / "t.md").read_text() == "cpu"
  assert (tmp_path / "runs").is_dir() and "NOTEBOOK_SIZE" not in os.environ


def test_compilation_cache_keeps_one_set_by_the_environment(tmp_path, monkeypatch):
  updates = {}
  monkeypatch.setattr(common.jax.config, "update",
                      lambda name, value: updates.__setitem__(name, value))
  monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "suite"))
  common.use_compilation_cache()
  assert updates == {}   # the suite's (or the user's) cache stays in force
  common.use_compilation_cache(tmp_path / "mine")
  assert updates["jax_compilation_cache_dir"] == str(tmp_path / "mine")
  assert updates["jax_compilation_cache_max_size"] > 0   # the file lock is on


def test_mean_std_rows_print_the_spread(tmp_path):
  from experiments import plotting  # pylint: disable=g-import-not-at-top
  row = plotting.mean_std_row([{"loss": 1.0}, {"loss": 2.0}, {"loss": 3.0}],
                              ["loss", "absent"], run="a")
  assert row == {"run": "a", "n": 3, "loss": 2.0, "loss_std": 1.0}
  one = plotting.mean_std_row([{"loss": 1.5}], ["loss"], run="b")
  text = plotting.results_table([row, one], path=tmp_path / "t.md")
  assert "| a | 3 | 2 ± 1 |" in text and "| b | 1 | 1.5 |" in text
  assert _read_csv(tmp_path / "t.csv")[0] == {"run": "a", "n": "3", "loss": "2.0",
                                              "loss_std": "1.0"}
  with pytest.raises(ValueError, match="no per-seed rows"):
    plotting.mean_std_row([], ["loss"])


def test_paired_test_is_the_readme_rule(tmp_path):
  """A two-sided paired t-test at 5 % (scipy's ttest_1samp agrees); with n = 3 a
  difference needs |mean| > 2.48 x std; tables mark it with *."""
  from scipy import stats  # pylint: disable=g-import-not-at-top
  from experiments import plotting  # pylint: disable=g-import-not-at-top
  for diffs in ([0.20, 0.33, 0.13], [0.037, 0.05, 0.02], [0.91, 1.0, 0.8],
                [-0.12, -0.09, -0.15], [0.1, -0.1, 0.05, 0.2]):
    got = plotting.paired_test(diffs)
    want = stats.ttest_1samp(diffs, 0.0)
    assert abs(got["t"] - want.statistic) < 1e-9 and abs(got["p"] - want.pvalue) < 1e-9
    assert got["significant"] == (want.pvalue < 0.05)
  assert abs(plotting.paired_threshold(3) - 2.4841) < 1e-3
  # The two cases: 1.8x and 1.75x the paired std are both "no difference".
  assert not plotting.paired_test([0.20 - 0.11, 0.20, 0.20 + 0.11])["significant"]
  assert plotting.paired_test([0.9, 1.0, 0.8])["significant"]
  assert not plotting.paired_test([0.5])["significant"]             # one seed
  assert plotting.paired_test([0.1, 0.1, 0.1])["significant"]       # no spread
  assert not plotting.paired_test([0.0, 0.0])["significant"]
  rows = [plotting.mean_std_row([{"d_x": 1.0}, {"d_x": 1.1}, {"d_x": 0.9}], ["d_x"],
                                run="yes"),
          plotting.mean_std_row([{"d_x": 1.0}, {"d_x": -1.0}, {"d_x": 0.5}], ["d_x"],
                                run="no")]
  assert rows[0]["d_x_sig"] is True and rows[1]["d_x_sig"] is False
  text = plotting.results_table(rows, path=tmp_path / "t.md")
  assert "| yes | 3 | 1 ± 0.1 * |" in text and "| no | 3 | 0.1667 ± 1 |" in text
  assert _read_csv(tmp_path / "t.csv")[0]["d_x_sig"] == "True"


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
  assert config.train.async_checkpoint is False and config.task_options.sample_tokens == 0
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
  env["XLA_FLAGS"] = "--xla_backend_optimization_level=0"  # conftest's, no device count
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
    assert sorted(losses) == sorted([
        "baseline", "post_ln", "pos_sinusoidal", "pos_sinusoidal_unscaled",
        "pos_learned_scaled", "pos_rotary", "beta_0.1x", "beta_10x", "hard", "hard_st",
        "impl_xla", "impl_chunked", "impl_pallas"]), sorted(losses)
    # Both embedding conventions and both hard-attention variants are arms.
    arms = {r["run"]: r for r in rows}
    assert arms["pos_sinusoidal"]["embeddings"] != arms["pos_sinusoidal_unscaled"][
        "embeddings"]
    assert "straight-through" in arms["hard_st"]["attention"]
    # Every arm's row carries the unigram baseline it is to be read against.
    assert all(float(r["unigram_bits_per_byte"]) > 0 for r in rows), rows
