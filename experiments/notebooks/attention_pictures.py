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
# # Attention pictures
#
# 1. Heat maps per layer and head of the byte-level GPT (`gpt_bytes.py`) on a line of
#    Python: which bytes each byte attends to.
# 2. ViT attention rollout (Abnar & Zuidema 2020) from the [CLS] token over the patches of
#    `shapes` images (`vit_shapes.py`).
# 3. Axial attention maps of the axial classifier on the same images: the row and column
#    maps of one pixel, and where that pixel reads from after both.
# 4. Token embeddings: the nearest bytes (cosine similarity) in the trained GPT's table,
#    and whether neighbours share a kind (letter, digit, space, punctuation) more often
#    than chance.
#
# The maps come from `jaxformer.analysis` (every `MultiHeadAttention` sows its weights
# into 'intermediates'); the models are trained here with
# `jaxformer.training.loop.train`. Sizes (`NOTEBOOK_SIZE`): `tiny` (CI, seconds per
# model), `cpu` (the committed `results/attention_pictures.ipynb`: the GPT is the real
# `gpt_bytes` run, 2,000 steps), `full` (`FULL=1`, accelerator).

# %%
import os
import pathlib
import sys

ROOT = pathlib.Path.cwd()
while not (ROOT / "pyproject.toml").exists() and ROOT != ROOT.parent:
  ROOT = ROOT.parent
sys.path.insert(0, str(ROOT))

import jax.numpy as jnp
import numpy as np

from experiments import plotting
from experiments.configs import common as configs_common
from experiments.configs import gpt_bytes
from experiments.configs import vit_shapes
from experiments.notebooks import common
from jaxformer import analysis
from jaxformer import tasks
from jaxformer.data import synthetic
from jaxformer.data import vocab
from jaxformer.models import registry

SIZE = common.size()
FULL = SIZE == "full"
OUT = common.out_dir("attention_pictures")
RUNS = common.runs_dir("attention_pictures")
VARIANT = "" if FULL else "tiny"
rows = []

# %% [markdown]
# ## 1. Byte-level GPT on a line of code

# %%
gpt_config = gpt_bytes.get_config("" if SIZE != "tiny" else "tiny")
if SIZE == "tiny":
  gpt_config = common.with_overrides(gpt_config, {
      "train.num_steps": 300, "train.log_every": 50, "train.eval_every": 300,
      "train.eval_batches": 4, "optimizer.warmup_steps": 20})
if SIZE != "full":
  # One CPU device, not gpt_bytes' one per core: the two-device all-reduce can stall
  # past XLA:CPU's rendezvous timeout inside a notebook kernel on a loaded machine
  # (the kernel then dies), as ablation_architecture notes.
  gpt_config = common.with_overrides(gpt_config, {"sharding.cpu_devices": 0})
summary = common.train_run(gpt_config, RUNS / "gpt")
rows.append(dict(model="gpt_bytes", eval_loss=summary.get("eval_loss"),
                 seconds=round(summary["run_seconds"], 1)))
model, params = common.trained_model(gpt_config, RUNS / "gpt")
tokenizer = vocab.build_tokenizer(gpt_config.data)

snippet = "def add(a, b):\n    return a + b\n"
ids = [tokenizer.bos_id] + tokenizer.encode(snippet)
ids = ids[:gpt_config.model.max_len]
tokens = jnp.asarray([ids], jnp.int32)
maps = analysis.attention_weights(model, {"params": params}, tokens)
labels = ["<s>"] + plotting.token_labels(snippet)
labels = labels[:len(ids)]
plotting.plot_attention_heads(maps, labels=labels,
                              title="byte GPT: attention per layer (rows) and head",
                              path=OUT / "gpt_heads.png")
for name, w in analysis.to_numpy(maps).items():
  w = w[0]
  prev = np.mean([w[h, i, i - 1] for h in range(w.shape[0]) for i in range(1, w.shape[1])])
  own = np.mean([w[h, i, i] for h in range(w.shape[0]) for i in range(w.shape[1])])
  first = np.mean(w[:, 1:, 0])
  print(f"{name}: mean weight on previous byte {prev:.3f}, on itself {own:.3f}, "
        f"on <s> {first:.3f}")

# %% [markdown]
# ## 2. ViT attention rollout over patches

# %%
vit_config = vit_shapes.get_config(VARIANT)
if not FULL:
  vit_config = common.with_overrides(vit_config, {
      "train.num_steps": 150, "train.log_every": 25, "train.eval_every": 150,
      "train.eval_batches": 2})
summary = common.train_run(vit_config, RUNS / "vit")
rows.append(dict(model="vit_shapes", eval_loss=summary.get("eval_loss"),
                 eval_accuracy=summary.get("eval_accuracy"),
                 seconds=round(summary["run_seconds"], 1)))
vit_model, vit_params = common.trained_model(vit_config, RUNS / "vit")

vit_task = tasks.build_task(vit_config,
                            model_config=registry.build_model(vit_config.model)[0])
batch = next(vit_task.batches(batch_size=64, seed=0, train=False))
picks = [int(np.flatnonzero(batch["labels"] == c)[0])
         for c in range(len(synthetic.SHAPES)) if np.any(batch["labels"] == c)]
images = jnp.asarray(batch["image"][picks])
grid = analysis.vit_rollout(vit_model, {"params": vit_params}, images)
pred = np.asarray(vit_model.apply({"params": vit_params}, images)).argmax(-1)
titles = [f"{synthetic.SHAPES[batch['labels'][i]]}\n(pred {synthetic.SHAPES[p]})"
          for i, p in zip(picks, pred)]
plotting.plot_rollout_overlay(np.asarray(images), np.asarray(grid), titles=titles,
                              path=OUT / "vit_rollout.png")
# How much of the rollout falls on the bright (shape) patches vs their share of area.
patch = vit_config.model.patch_size
bright = np.asarray(images)[..., 0].reshape(len(picks), grid.shape[1], patch,
                                             grid.shape[2], patch).mean((2, 4))
on_shape = bright > np.median(bright, axis=(1, 2), keepdims=True)
share = float((np.asarray(grid) * on_shape).sum((1, 2)).mean())
print(f"rollout mass on the brighter half of the patches: {share:.2f} (0.5 = uniform)")
rows[-1]["rollout_on_bright_half"] = share

# %% [markdown]
# ## 3. Axial attention maps

# %%
axial_config = common.with_overrides(vit_config, {})
vm = vit_config.model
axial_config.model = configs_common.model(
    "axial_classifier_tiny", image_size=(vm.image_size, vm.image_size),
    num_channels=vm.num_channels, patch_size=1, num_classes=vm.num_classes,
    num_layers=max(vm.num_layers // 2, 1), embed_dim=vm.embed_dim,
    block={k: vm.block[k] for k in ("num_heads", "mlp_dim", "dtype", "param_dtype")})
summary = common.train_run(axial_config, RUNS / "axial")
rows.append(dict(model="axial_classifier", eval_loss=summary.get("eval_loss"),
                 eval_accuracy=summary.get("eval_accuracy"),
                 seconds=round(summary["run_seconds"], 1)))
axial_model, axial_params = common.trained_model(axial_config, RUNS / "axial")

axial_maps = analysis.axial_attention_maps(axial_model, {"params": axial_params},
                                           images)
first = sorted(axial_maps)[:2]   # layers_0/attention_0 (rows), layers_0/attention_1 (cols)
row_maps, col_maps = axial_maps[first[0]], axial_maps[first[1]]
example = 0
img = np.asarray(images[example, ..., 0])
query = tuple(int(v) for v in np.unravel_index(np.argmax(img), img.shape))
i, j = query
pixel_map = np.asarray(analysis.axial_pixel_map(row_maps, col_maps, query))[example]
row_line = np.zeros_like(img)
row_line[i, :] = np.asarray(row_maps)[example, i, :, j, :].mean(0)
col_line = np.zeros_like(img)
col_line[:, j] = np.asarray(col_maps)[example, j, :, i, :].mean(0)
plotting.plot_image_maps(
    np.stack([row_line, col_line, pixel_map]), image=img,
    titles=["row attention", "column attention", "rows then columns"],
    marks=[query] * 3, suptitle=f"axial attention of pixel {query} (layer 0, mean of heads)",
    path=OUT / "axial_pixel.png")
plotting.plot_attention_heads(
    {f"row {i}": np.asarray(row_maps)[example, i], f"column {j}":
     np.asarray(col_maps)[example, j]},
    title="axial attention along one row and one column (per head)",
    path=OUT / "axial_heads.png")

# %% [markdown]
# ## 4. Nearest tokens in the GPT's embedding table
#
# `analysis.nearest_neighbours` ranks rows of the token table by cosine similarity (the
# angle, not the length, which mostly tracks frequency). Only the printable ASCII bytes
# (plus newline and tab) are compared: the other 160-odd byte rows (and the padding
# rows, where the hardware pads the vocabulary) never occur in the training text and
# keep their initialisation. A table that learned
# something puts bytes used alike (lower-case letters, digits, brackets) near each other;
# the last column measures that against the share a random neighbour would have.

# %%
KINDS = {"lower": str.islower, "upper": str.isupper, "digit": str.isdigit,
         "space": str.isspace}
kind_of = lambda ch: next((k for k, f in KINDS.items() if f(ch)), "punct")  # noqa: E731
chars = [chr(c) for c in range(32, 127)] + ["\n", "\t"]
char_ids = np.asarray([tokenizer.encode(c)[0] for c in chars], np.int32)
table = np.asarray(analysis.embedding_table(params))[char_ids]   # [97, D]
queries = ["e", "a", "E", "0", "7", "(", "[", ",", " ", "\n", "=", "_"]
q_rows = np.asarray([chars.index(c) for c in queries], np.int32)
nn_ids, nn_sims = analysis.nearest_neighbours(table, q_rows, k=5)
show = lambda c: repr(c)[1:-1] if c in "\n\t" else (c if c != " " else "␣")  # noqa
lines = ["| byte | nearest 5 (cosine) |", "|---|---|"]
for c, ids_k, sims_k in zip(queries, np.asarray(nn_ids), np.asarray(nn_sims)):
  near = ", ".join(f"`{show(chars[i])}` {s:.2f}" for i, s in zip(ids_k, sims_k))
  lines.append(f"| `{show(c)}` | {near} |")
common.show_table("\n".join(lines))

# Same-kind share among the 5 nearest, per kind, against a random neighbour's chance.
kinds = np.asarray([kind_of(c) for c in chars])
all_ids, _ = analysis.nearest_neighbours(table, np.arange(len(chars), dtype=np.int32),
                                         k=5)
same = kinds[np.asarray(all_ids)] == kinds[:, None]
kind_rows = []
for kind in ("lower", "upper", "digit", "punct", "space"):
  members = kinds == kind
  kind_rows.append(dict(kind=kind, bytes=int(members.sum()),
                        same_kind_in_top5=float(same[members].mean()),
                        chance=float((members.sum() - 1) / (len(chars) - 1))))
common.show_table(plotting.results_table(kind_rows, path=OUT / "embedding_kinds.md"))
rows.append(dict(model="gpt_bytes embeddings",
                 same_kind_in_top5=float(same.mean()),
                 chance=float(np.mean([r["chance"] for r in kind_rows]))))

# %% [markdown]
# **What the table shows** (cpu size, the committed `results/attention_pictures.ipynb`;
# the tiny run trains for seconds and shows far less). After the 2,000-step
# `gpt_bytes` run the table is organised by use, not by code point: each vowel's nearest
# bytes are the other vowels (`e` → `a i o y`, `E` → `A O I`), the digits' five nearest
# are all digits (100 % against 9 % for a random byte), the opening brackets `( [ {`
# sit together, and so do operators (`=` → `+ ! < & >`) and the punctuation that ends an
# expression (`,` → `) : .`). Among the whitespace bytes, space and newline are each
# other's nearest, while tab (rare in the standard library, which indents with spaces)
# is in neither's five nearest: hence the low same-kind share of that row.

# %%
common.show_table(plotting.results_table(rows, path=OUT / "results.md"))
