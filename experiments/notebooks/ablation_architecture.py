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
# # Architecture ablations on the byte-level GPT
#
# Short runs of `experiments/configs/gpt_bytes.py` (the main job) that differ in one
# thing each, with identical seeds and data order:
#
# 1. **Norm placement**: pre-LN (GPT-2) vs post-LN (original Transformer).
# 2. **Positions**: learned vs sinusoidal vs rotary (RoPE).
# 3. **Soft vs hard attention and the inverse temperature β**: β as a multiple of the
#    default `1/sqrt(head_dim)` (`model.block.attention_scale_multiplier`), and arg-max
#    attention (`model.block.attention_hard`; gradients reach the values only).
# 4. **Attention implementations**: `xla`, `chunked` and `pallas` (interpret mode on
#    the CPU) must give the same curves up to float rounding.
#
# Default: the tiny config at 300 steps (CPU, one to two minutes in all). That is a
# smoke test of the machinery, not a result: at 300 steps the baseline is still at the
# unigram level (4.40 bits/byte against 4.38 for a unigram model, issue 13),
# so the quality differences between arms of sections 1-3 at this size are noise, not
# findings (section 4's agreement of the implementations is a real check at any size).
# `FULL=1`: the real config
# (4 x 128, context 64, 2000 steps per run; use an accelerator). Outputs (PNG, markdown,
# CSV) go to `$OUT_DIR` (default `experiments/notebooks/out/ablation_architecture/`).

# %%
import os
import pathlib
import sys

ROOT = pathlib.Path.cwd()
while not (ROOT / "pyproject.toml").exists() and ROOT != ROOT.parent:
  ROOT = ROOT.parent
sys.path.insert(0, str(ROOT))

import numpy as np

from experiments import plotting
from experiments.configs import gpt_bytes
from experiments.notebooks import common

FULL = os.environ.get("FULL") == "1"
OUT = common.out_dir("ablation_architecture")
RUNS = OUT / "runs"

base = gpt_bytes.get_config("" if FULL else "tiny")
if not FULL:
  # 300 steps of the tiny model (compilation dominates the run time anyway): enough to
  # exercise every arm end to end, not to leave the unigram stage (see above).
  base = common.with_overrides(base, {
      "train.num_steps": 300, "train.log_every": 10, "train.eval_every": 100,
      "train.eval_batches": 8, "optimizer.warmup_steps": 20})
print("steps per run:", base.train.num_steps, "| model:", dict(base.model))

# %%
results = {}


def run(label, overrides=None, **columns):
  summary = common.train_run(base, RUNS / label, overrides=overrides)
  results[label] = dict(
      run=label, **columns,
      train_loss=common.final_train_loss(summary["workdir"]),
      eval_loss=summary.get("eval_loss"),
      eval_bits_per_byte=summary.get("eval_bits_per_byte"),
      step_ms=summary.get("step_time_ms"), params=summary["num_params"],
      seconds=round(summary["run_seconds"], 1))
  return summary


BASELINE = dict(norm="pre", positions="learned", attention="soft", beta="1x",
                impl="xla")
run("baseline", {"model.block.attention_impl": "xla"}, **BASELINE)

# %% [markdown]
# ## 1. Pre-LN vs post-LN

# %%
run("post_ln", {"model.block.norm": "post", "model.block.attention_impl": "xla"},
    **{**BASELINE, "norm": "post"})
norm_rows = [results["baseline"], results["post_ln"]]
print(plotting.results_table(norm_rows, path=OUT / "norm.md"))
plotting.plot_loss_curves({"pre-LN": RUNS / "baseline", "post-LN": RUNS / "post_ln"},
                          title="norm placement", path=OUT / "norm.png")

# %% [markdown]
# ## 2. Learned vs sinusoidal vs rotary positions

# %%
for kind in ("sinusoidal", "rotary"):
  run(f"pos_{kind}", {"model.positions": kind, "model.block.attention_impl": "xla"},
      **{**BASELINE, "positions": kind})
pos_runs = {"learned": "baseline", "sinusoidal": "pos_sinusoidal", "rotary": "pos_rotary"}
print(plotting.results_table([results[r] for r in pos_runs.values()],
                             path=OUT / "positions.md"))
plotting.plot_loss_curves({k: RUNS / r for k, r in pos_runs.items()},
                          title="positions", path=OUT / "positions.png")

# %% [markdown]
# ## 3. Soft vs hard attention; the inverse temperature β
#
# β multiplies `q·k`; `1x` is the usual `1/sqrt(head_dim)`
# (`--config.model.block.attention_scale_multiplier=10` on the command line, once the config
# file lists the field). Small β flattens the attention towards a uniform average over
# the prefix; large β sharpens it towards the arg-max.
#
# Hard attention (`model.block.attention_hard=True`) is the arg-max itself. The weights are a
# step function of `q·k`, so **no gradient reaches the query and key projections**:
# they keep their random initialisation (weight decay only shrinks them, which leaves
# the arg-max alone: their biases start at zero and get no gradient either), and each
# token reads the value of the key that these fixed random projections of its (learned)
# features pick. What trains is the values, the output projection, the MLPs and the
# embeddings; the run measures how far that gets without learned attention patterns,
# not hard attention trained end to end (that needs e.g. a straight-through estimator).

# %%
BETAS = (0.1, 1.0, 10.0) if not FULL else (0.03, 0.1, 0.3, 1.0, 3.0, 10.0)
beta_runs = {}
for beta in BETAS:
  label = "baseline" if beta == 1.0 else f"beta_{beta:g}x"
  if beta != 1.0:
    run(label, {"model.block.attention_impl": "xla", "model.block.attention_scale_multiplier": beta},
        **{**BASELINE, "beta": f"{beta:g}x"})
  beta_runs[f"soft β={beta:g}x"] = label
run("hard", {"model.block.attention_impl": "xla", "model.block.attention_hard": True},
    **{**BASELINE, "attention": "hard", "beta": "-"})
beta_runs["hard"] = "hard"
print(plotting.results_table([results[r] for r in beta_runs.values()],
                             path=OUT / "attention_beta.md"))
plotting.plot_loss_curves({k: RUNS / r for k, r in beta_runs.items()},
                          title="soft (β sweep) vs hard attention",
                          path=OUT / "attention_curves.png")
plotting.plot_sweep(BETAS, {
    "eval loss": [results["baseline" if b == 1.0 else f"beta_{b:g}x"]["eval_loss"]
                  for b in BETAS],
    "hard (eval loss)": [results["hard"]["eval_loss"]] * len(BETAS)},
                    xlabel="β / (1/sqrt(head_dim))", ylabel="eval loss", log_x=True,
                    title="inverse temperature", path=OUT / "attention_beta.png")

# %% [markdown]
# ## 4. Attention implementations give the same curves

# %%
for impl in ("chunked", "pallas"):
  run(f"impl_{impl}", {"model.block.attention_impl": impl}, **{**BASELINE, "impl": impl})
impl_runs = {"xla": "baseline", "chunked": "impl_chunked", "pallas": "impl_pallas"}
ref_steps, ref_loss = plotting.series(plotting.read_metrics(RUNS / "baseline"), "loss")
for impl, label in impl_runs.items():
  steps, loss = plotting.series(plotting.read_metrics(RUNS / label), "loss")
  assert np.array_equal(steps, ref_steps), (impl, steps, ref_steps)
  results[label]["max_abs_loss_diff_vs_xla"] = float(np.max(np.abs(loss - ref_loss)))
print(plotting.results_table(
    [results[r] for r in impl_runs.values()],
    columns=["run", "impl", "train_loss", "eval_loss", "max_abs_loss_diff_vs_xla",
             "step_ms", "seconds"], path=OUT / "implementations.md"))
plotting.plot_loss_curves({k: RUNS / r for k, r in impl_runs.items()},
                          title="attention implementations (should overlap)",
                          path=OUT / "implementations.png")

# %% [markdown]
# ## All runs

# %%
COLUMNS = ["run", "norm", "positions", "attention", "beta", "impl", "train_loss",
           "eval_loss", "eval_bits_per_byte", "step_ms", "params", "seconds"]
print(plotting.results_table(list(results.values()), columns=COLUMNS,
                             path=OUT / "results.md"))
