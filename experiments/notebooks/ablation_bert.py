# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # BERT pre-training ablations: next-sentence prediction and the mask rate
#
# Runs of `experiments/configs/bert_mlm.py` with identical seeds and sentence pairs:
#
# 5. **With vs without NSP**: the same `[CLS] A [SEP] B [SEP]` pairs, MLM loss alone or
#    MLM + NSP (`task_options.nsp`, which also adds the NSP head).
# 6. **Mask rate**: the fraction of tokens chosen for prediction (80/10/10 replacement).
#    Losses at different rates are not comparable (more masking = less context *and*
#    different positions scored), so every run is also scored at the same 15% rate on
#    the same held-out pairs (`common.evaluate`).
#
# Default: the tiny config (2 x 64 over bytes of the standard library; CPU). `FULL=1`:
# BERT-base on `imdb_reviews` (needs the prepared TFDS data and an accelerator).

# %%
import os
import pathlib
import sys

ROOT = pathlib.Path.cwd()
while not (ROOT / "pyproject.toml").exists() and ROOT != ROOT.parent:
  ROOT = ROOT.parent
sys.path.insert(0, str(ROOT))

from experiments import plotting
from experiments.configs import bert_mlm
from experiments.notebooks import common

FULL = os.environ.get("FULL") == "1"
OUT = common.out_dir("ablation_bert")
RUNS = OUT / "runs"

base = bert_mlm.get_config("" if FULL else "tiny")
if not FULL:
  # 100 steps of batch 16 (the CPU test budget): a first look, not a result.
  base = common.with_overrides(base, {
      "train.num_steps": 100, "train.log_every": 10, "train.eval_every": 50,
      "train.eval_batches": 2, "data.batch_size": 16, "data.eval_batch_size": 32})
print("steps per run:", base.train.num_steps, "| model:", dict(base.model))

# %%
results = {}
REFERENCE_RATE = 0.15


def run(label, overrides):
  config = common.with_overrides(base, overrides)
  summary = common.train_run(config, RUNS / label)
  model, params = common.trained_model(config, RUNS / label)
  at_ref = common.evaluate(config, params, task_options={"mask_rate": REFERENCE_RATE,
                                                         "nsp": False})
  results[label] = dict(
      run=label, nsp=bool(config.task_options.nsp),
      mask_rate=config.task_options.mask_rate,
      eval_mlm_loss=summary.get("eval_mlm_loss"),
      eval_mlm_accuracy=summary.get("eval_accuracy"),
      eval_nsp_accuracy=summary.get("eval_nsp_accuracy"),
      mlm_loss_at_15=at_ref["mlm_loss"], mlm_accuracy_at_15=at_ref["accuracy"],
      step_ms=summary.get("step_time_ms"), seconds=round(summary["run_seconds"], 1))
  del model
  return summary


run("mlm", {})
run("mlm_nsp", {"task_options.nsp": True})

# %% [markdown]
# ## 5. With and without NSP

# %%
nsp_rows = [results["mlm"], results["mlm_nsp"]]
print(plotting.results_table(
    nsp_rows, columns=["run", "nsp", "eval_mlm_loss", "eval_mlm_accuracy",
                       "eval_nsp_accuracy", "step_ms", "seconds"],
    path=OUT / "nsp.md"))
plotting.plot_loss_curves({"MLM": RUNS / "mlm", "MLM + NSP": RUNS / "mlm_nsp"},
                          keys=("mlm_loss", "eval_mlm_loss"),
                          title="BERT: masked-LM loss with and without NSP",
                          path=OUT / "nsp.png")

# %% [markdown]
# ## 6. Mask rate

# %%
RATES = (0.15, 0.3, 0.5) if not FULL else (0.05, 0.15, 0.3, 0.45, 0.6)
rate_runs = {}
for rate in RATES:
  label = "mlm" if rate == 0.15 else f"mask_{rate:g}"
  if label not in results:
    run(label, {"task_options.mask_rate": rate})
  rate_runs[f"{rate:.0%}"] = label
print(plotting.results_table(
    [results[r] for r in rate_runs.values()],
    columns=["run", "mask_rate", "eval_mlm_loss", "mlm_loss_at_15",
             "mlm_accuracy_at_15", "step_ms", "seconds"],
    path=OUT / "mask_rate.md"))
plotting.plot_sweep(RATES, {
    "eval at its own rate": [results[r]["eval_mlm_loss"] for r in rate_runs.values()],
    "eval at 15%": [results[r]["mlm_loss_at_15"] for r in rate_runs.values()]},
                    xlabel="mask rate (training)", ylabel="masked-LM loss",
                    title="BERT: mask rate", path=OUT / "mask_rate.png")
plotting.plot_loss_curves({k: RUNS / r for k, r in rate_runs.items()},
                          keys=("mlm_loss",), title="train MLM loss per mask rate",
                          path=OUT / "mask_rate_curves.png")

# %%
print(plotting.results_table(list(results.values()), path=OUT / "results.md"))
