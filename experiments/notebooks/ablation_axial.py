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
# # Full vs axial attention on images: quality, time, memory
#
# Two pairs of runs with identical seeds and images (the synthetic `shapes` set):
#
# * **Generative** (bits per pixel, lower is better): ImageGPT, full causal attention
#   over the `H*W` pixels in raster order (`experiments/configs/image_gpt_shapes.py`),
#   vs the Axial Transformer, causal attention along rows and columns
#   (`experiments/configs/axial_shapes.py`), at about the same width and depth.
# * **Classification** (accuracy): ViT, full attention over patches
#   (`experiments/configs/vit_shapes.py`), vs the axial classifier on the same patches.
#
# Memory: the compiled forward + backward pass's temporary buffers (XLA's memory
# analysis) at the run's size and at larger images, where full attention's `N^2` scores
# dominate while axial attention stores `N * (H + W)`.
#
# Default: tiny (CPU). `FULL=1`: the configs' real sizes (CIFAR-10; accelerator).

# %%
import os
import pathlib
import sys

ROOT = pathlib.Path.cwd()
while not (ROOT / "pyproject.toml").exists() and ROOT != ROOT.parent:
  ROOT = ROOT.parent
sys.path.insert(0, str(ROOT))

import flax.linen as nn
import jax
import jax.numpy as jnp

from experiments import plotting
from experiments.configs import axial_shapes
from experiments.configs import common as configs_common
from experiments.configs import image_gpt_shapes
from experiments.configs import vit_shapes
from experiments.notebooks import common
from jaxformer.models import registry

FULL = os.environ.get("FULL") == "1"
OUT = common.out_dir("ablation_axial")
RUNS = OUT / "runs"
VARIANT = "" if FULL else "tiny"
GEN_STEPS = {} if FULL else {"train.num_steps": 100, "train.log_every": 10,
                             "train.eval_every": 50, "train.eval_batches": 2}
CLS_STEPS = {} if FULL else {"train.num_steps": 60, "train.log_every": 5,
                             "train.eval_every": 20, "train.eval_batches": 2}

igpt = common.with_overrides(image_gpt_shapes.get_config(VARIANT), GEN_STEPS)
axial = common.with_overrides(axial_shapes.get_config(VARIANT), GEN_STEPS)
if not FULL:
  # Match ImageGPT-tiny's width (64) and depth (2 blocks: 1 outer + 1 inner).
  axial = common.with_overrides(axial, {
      "model.embed_dim": 64, "model.block.num_heads": 4, "model.block.mlp_dim": 128})
vit = common.with_overrides(vit_shapes.get_config(VARIANT), CLS_STEPS)
axial_cls = common.with_overrides(vit, {})
vm = vit.model
axial_cls.model = configs_common.model(
    "axial_classifier_tiny", image_size=(vm.image_size, vm.image_size),
    num_channels=vm.num_channels, patch_size=vm.patch_size, num_classes=vm.num_classes,
    num_layers=max(vm.num_layers // 2, 1),   # an axial block has two attention layers
    embed_dim=vm.embed_dim, remat=vm.remat, block={
        k: vm.block[k] for k in ("num_heads", "mlp_dim", "dropout_rate",
                                 "attention_impl", "dtype", "param_dtype")})

# %% [markdown]
# ## Training runs

# %%
results = {}


def run(label, config, attention, metric_keys):
  summary = common.train_run(config, RUNS / label)
  row = dict(run=label, model=config.model.name, attention=attention,
             params=summary["num_params"], step_ms=summary.get("step_time_ms"),
             seconds=round(summary["run_seconds"], 1))
  row.update({k: summary.get(f"eval_{k}") for k in metric_keys})
  results[label] = row


run("image_gpt", igpt, "full (causal)", ("bits_per_token", "nll"))
run("axial_transformer", axial, "axial (causal)", ("bits_per_token", "nll"))
run("vit", vit, "full", ("accuracy", "loss"))
run("axial_classifier", axial_cls, "axial", ("accuracy", "loss"))

# %% [markdown]
# ## Memory of one forward + backward pass

# %%


def grad_temp_bytes(config, batch, image_size=None, impl=None):
  """XLA's temporary-buffer size of ``grad(mean(logits**2))`` for one batch (bytes)."""
  overrides = {}
  if image_size is not None:  # ViT takes one side; ImageGPT and axial (height, width)
    square = isinstance(config.model.image_size, int)
    overrides["model.image_size"] = image_size if square else (image_size, image_size)
  if impl is not None:
    overrides["model.block.attention_impl"] = impl
  section = common.with_overrides(config, overrides).model
  model_cfg, model = registry.build_model(section)
  size = model_cfg.image_size
  h, w = size if isinstance(size, tuple) else (size, size)
  if section.name == "image_gpt":
    x = jax.ShapeDtypeStruct((batch, h * w), jnp.int32)
  elif section.name == "axial_transformer":
    x = jax.ShapeDtypeStruct((batch, h, w), jnp.int32)
  else:
    x = jax.ShapeDtypeStruct((batch, h, w, model_cfg.num_channels), jnp.float32)
  params = nn.meta.unbox(jax.eval_shape(model.init, jax.random.key(0), x))["params"]

  def loss(p, inputs):
    return jnp.mean(jnp.square(model.apply({"params": p}, inputs)))

  compiled = jax.jit(jax.grad(loss)).lower(params, x).compile()
  stats = compiled.memory_analysis()
  return float("nan") if stats is None else int(stats.temp_size_in_bytes)


# Full attention on the "xla" path materialises the N^2 scores; "chunked" (the CPU
# default from 1M scores on) streams over key blocks in O(N * block).
MIB = 2**20
SIZES = (16, 32) if not FULL else (32, 64, 96)
memory_rows = []
for s in SIZES:
  memory_rows.append(dict(
      image=f"{s}x{s}", pixels=s * s,
      full_xla_MiB=grad_temp_bytes(igpt, 8, s, "xla") / MIB,
      full_chunked_MiB=grad_temp_bytes(igpt, 8, s, "chunked") / MIB,
      axial_MiB=grad_temp_bytes(axial, 8, s, "xla") / MIB,
      full_scores_per_head=(s * s) ** 2, axial_scores_per_head=s * s * 2 * s))
for label, config in (("image_gpt", igpt), ("axial_transformer", axial)):
  results[label]["temp_MiB_at_run_size"] = round(
      grad_temp_bytes(config, config.data.batch_size) / MIB, 3)
print(plotting.results_table(memory_rows, path=OUT / "memory.md"))
plotting.plot_sweep([r["pixels"] for r in memory_rows],
                    {"full, xla (N^2 scores)": [r["full_xla_MiB"] for r in memory_rows],
                     "full, chunked": [r["full_chunked_MiB"] for r in memory_rows],
                     "axial": [r["axial_MiB"] for r in memory_rows]},
                    xlabel="pixels per image", ylabel="temp MiB (batch 8, fwd+bwd)",
                    log_x=True, title="memory: full vs axial attention",
                    path=OUT / "memory.png")

# %% [markdown]
# ## Results

# %%
print(plotting.results_table(
    [results["image_gpt"], results["axial_transformer"]],
    columns=["run", "attention", "bits_per_token", "nll", "params", "step_ms",
             "temp_MiB_at_run_size", "seconds"], path=OUT / "generative.md"))
print(plotting.results_table(
    [results["vit"], results["axial_classifier"]],
    columns=["run", "attention", "accuracy", "loss", "params", "step_ms", "seconds"],
    path=OUT / "classification.md"))
plotting.plot_loss_curves({"ImageGPT (full)": RUNS / "image_gpt",
                           "Axial Transformer": RUNS / "axial_transformer"},
                          title="generative: train / eval loss (nats per pixel)",
                          path=OUT / "generative.png")
plotting.plot_loss_curves({"ViT (full)": RUNS / "vit",
                           "axial classifier": RUNS / "axial_classifier"},
                          keys=("loss", "eval_loss", "eval_accuracy"),
                          title="classification", path=OUT / "classification.png")
plotting.plot_bars({k: v["step_ms"] for k, v in results.items()}, ylabel="ms / step",
                   title="step time", path=OUT / "step_time.png")
print(plotting.results_table(list(results.values()), path=OUT / "results.md"))
