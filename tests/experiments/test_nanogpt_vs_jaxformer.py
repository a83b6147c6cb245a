"""experiments/benchmarks/nanogpt_vs_jaxformer.py without torch or nanoGPT: its
commands, nanoGPT's log parsed, the export + prepare step on a stand-in repository,
the medians and ratios, the report (the same-windows score: test_same_windows.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from experiments.benchmarks import nanogpt_vs_jaxformer as nv
from experiments.benchmarks import same_windows

LOG = """tokens per iteration will be: 768
step 0: train loss 4.2000, val loss 4.1900
iter 0: loss 4.1800, time 900.00ms, mfu -100.00%
""" + "".join(f"iter {i}: loss 3.0, time {50 + i % 3}.00ms, mfu 0.01%\n"
              for i in range(1, 250)) + """step 250: train loss 2.0000, val loss 2.1000
iter 250: loss 2.0, time 400.00ms, mfu 0.01%
iter 251: loss 2.0, time 51.00ms, mfu 0.01%
step 500: train loss 1.5000, val loss 1.8861
iter 500: loss 1.5, time 380.00ms, mfu 0.01%
"""


def test_commands_are_the_readme_recipe_and_our_cli():
  nano = nv.nanogpt_command(2000, "py")
  assert nano[:3] == ["py", "train.py", "config/train_shakespeare_char.py"]
  assert {"--device=cpu", "--compile=False", "--eval_iters=20", "--block_size=64",
          "--batch_size=12", "--n_layer=4", "--n_head=4", "--n_embd=128",
          "--max_iters=2000", "--lr_decay_iters=2000", "--dropout=0.0",
          "--always_save_checkpoint=True"} <= set(nano)
  assert not any(a.startswith("--eval_interval") for a in nano)
  assert "--eval_interval=30" in nv.nanogpt_command(30, "py")
  ours = nv.ours_command("/d/input.txt", "/w", 2000, "py")
  assert ours[:3] == ["py", "-m", "experiments.train"]
  assert {"--config=experiments/configs/gpt_text.py",
          "--config.data.source_options.path=/d/input.txt",
          "--config.data.tokenizer=chars",
          "--config.data.source_options.validation_fraction=0.1",
          "--workdir=/w"} == set(ours[3:])
  assert "--config.train.eval_every=30" in nv.ours_command("x", "w", 30, "py")


def test_parse_nanogpt_log():
  got = nv.parse_nanogpt_log(LOG)
  assert got["final_step"] == 500 and got["val_loss"] == pytest.approx(1.8861)
  assert [s for s, _, _ in got["evals"]] == [0, 250, 500]
  assert got["iterations"] == 253
  assert got["ms_per_step"] == 51.0        # eval iterations (400, 380 ms) left out
  with pytest.raises(ValueError, match="val loss"):
    nv.parse_nanogpt_log("iter 0: loss 4.0, time 1.0ms, mfu 0%\n")


def _run(side, pair, wall, cpu, loss, ms=50.0, code=0):
  return {"side": side, "pair": pair, "wall_s": wall, "cpu_s": cpu,
          "cores_busy": cpu / wall, "ms_per_step": ms, "val_loss": loss,
          "common_loss": loss + 0.01,
          "returncode": code, "load_before": [0.1, 0, 0], "load_after": [1.9, 0, 0]}


def test_summary_medians_and_ratios_and_report():
  runs = [_run("nanogpt", 1, 100.0, 190.0, 1.89), _run("ours", 1, 90.0, 170.0, 1.87),
          _run("nanogpt", 2, 120.0, 200.0, 1.88), _run("ours", 2, 96.0, 180.0, 1.86),
          _run("ours", 3, 10.0, 1.0, 9.0, code=1)]     # a failed run is not counted
  s = nv.summarize(runs)
  assert s["ours"]["wall_s"] == 93.0 and s["nanogpt"]["wall_s"] == 110.0
  assert s["wall_ratio"] == pytest.approx(93 / 110)
  assert s["pair_wall_ratios"] == pytest.approx([0.9, 0.8])
  assert s["val_loss_delta"] == pytest.approx(1.865 - 1.885)
  assert s["common_loss_delta"] == pytest.approx(1.865 - 1.885)
  assert s["ours"]["common_losses"] == pytest.approx([1.88, 1.87])
  assert s["ours"]["runs"] == 2 and s["cpu_ratio"] == pytest.approx(175 / 195)
  results = {"summary": s, "runs": runs, "date_utc": "2026-12-06T09:00:00+00:00",
             "input_bytes": 1115394, "steps": 2000, "pairs": 2,
             "common_windows": 12000, "window_seed": same_windows.WINDOW_SEED,
             "order": ["nanogpt", "ours"], "nanogpt_commit": nv.NANOGPT_COMMIT,
             "jaxformer_commit": "abc", "torch": "2.13.0", "jax": "0.10.2",
             "command": "python -m ...",
             "machine": {"cpu": "EPYC", "nproc": 2, "python": "3.11",
                         "load_start": [0.1, 0.1, 0.1], "load_end": [2, 2, 2]}}
  md = nv.markdown(results)
  assert "**0.845**" in md and "1.8650" in md and "FAILED (1)" in md
  assert "**1.8750** | **1.8950** | **Δ -0.0200**" in md
  json.dumps(results)


def test_export_runs_prepare_on_the_given_text(tmp_path):
  """A stand-in for nanoGPT's repository: its prepare.py must see input.txt."""
  repo = tmp_path / "repo"
  (repo / "data" / "shakespeare_char").mkdir(parents=True)
  (repo / "data" / "shakespeare_char" / "prepare.py").write_text(
      "import os\nassert os.path.exists('input.txt')\n"
      "open('train.bin', 'w').write(str(len(open('input.txt').read())))\n")
  git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
  subprocess.run(["git", "init", "-q", str(repo)], check=True)
  subprocess.run([*git, "add", "-A"], check=True)
  subprocess.run([*git, "commit", "-qm", "x"], check=True)
  head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True,
                        check=True).stdout.strip()
  dest = nv.export_nanogpt(str(repo), head, str(tmp_path / "out"), b"hello world",
                           sys.executable)
  assert open(os.path.join(dest, "data", "shakespeare_char", "train.bin")).read() == "11"
  assert nv.read_input(f"{repo}:data/shakespeare_char/prepare.py").startswith(b"import")
  with pytest.raises(ValueError, match="git archive failed"):
    nv.export_nanogpt(str(repo), "0" * 40, str(tmp_path / "o2"), b"x", sys.executable)
  with pytest.raises(ValueError, match="neither a file nor GITDIR:PATH"):
    nv.read_input(str(tmp_path / "missing.txt"))


def test_read_ours(tmp_path):
  (tmp_path / "summary.json").write_text(json.dumps(
      {"step": 2000, "eval_loss": 1.85, "step_time_ms": 40.0, "num_params": 808_576,
       "wall_time_s": 90.0}))
  assert nv.read_ours(str(tmp_path)) == {
      "final_step": 2000, "val_loss": 1.85, "ms_per_step": 40.0,
      "num_params": 808_576, "wall_time_in_loop_s": 90.0}


def test_bad_arguments():
  with pytest.raises(SystemExit):
    nv.parse_args(["--nanogpt=x", "--input=y", "--out=z", "--pairs=0"])
