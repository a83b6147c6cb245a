"""Both final checkpoints of the nanoGPT comparison, scored on the same windows.

Each side's own evaluation reads 20 random batches (about ±0.015 from the windows
alone), so ``nanogpt_vs_jaxformer`` also scores each side's final checkpoint, through
that side's own model code and vocabulary, on the same held-out windows: ours with
:func:`score_ours` (``load_run``), nanoGPT's with :func:`score_nanogpt` (its
``model.py`` and ``meta.pkl``, in its own Python with torch).
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Sequence
from typing import Any

COMMON_WINDOWS = 12_000
WINDOW_SEED = 20261206
SCORE_BATCH = 240
# Run by nanoGPT's Python (torch) with argv: nanoGPT's tree, windows JSON. Reads the
# checkpoint nanoGPT's train.py left and its own character vocabulary (meta.pkl).
_SCORE_NANOGPT = r"""
import json, pickle, sys
import numpy as np, torch
nano, windows_path, batch = sys.argv[1], sys.argv[2], int(sys.argv[3])
sys.path.insert(0, nano)
from model import GPT, GPTConfig
ck = torch.load(f"{nano}/out-shakespeare-char/ckpt.pt", map_location="cpu")
model = GPT(GPTConfig(**ck["model_args"]))
model.load_state_dict({k.removeprefix("_orig_mod."): v for k, v in ck["model"].items()})
model.eval()
with open(f"{nano}/data/shakespeare_char/meta.pkl", "rb") as f:
  stoi = pickle.load(f)["stoi"]
with open(windows_path, encoding="utf-8") as f:
  ids = np.array([[stoi[c] for c in w] for w in json.load(f)], dtype=np.int64)
total = 0.0
with torch.no_grad():
  for b in range(0, len(ids), batch):
    x = torch.from_numpy(ids[b:b + batch])
    _, loss = model(x[:, :-1].contiguous(), x[:, 1:].contiguous())
    total += loss.item() * len(x)
print(json.dumps({"step": int(ck["iter_num"]), "loss": total / len(ids)}))
"""


def common_windows(text: bytes, count: int = COMMON_WINDOWS, length: int = 65,
                   seed: int = WINDOW_SEED) -> list[str]:
  """``count`` windows of ``length`` characters (a context of 64 and its targets) at
  fixed random places in the held-out tail that neither side trains on.

  That tail is our validation split (the last 10 %, ``local_text``'s rule); nanoGPT
  holds out ``text[int(0.9 n):]``, which starts at or before it. The same text, seed
  and count give the same windows on every run.
  """
  import numpy as np  # pylint: disable=import-outside-toplevel
  from jaxformer.data import local_text  # pylint: disable=import-outside-toplevel
  tail = text[local_text._tail_start(text, 0.1):].decode("utf-8")  # pylint: disable=protected-access
  if len(tail) < length:
    raise ValueError(f"the validation tail has {len(tail)} characters, fewer than "
                     f"one window of {length}")
  starts = np.random.default_rng(seed).integers(0, len(tail) - length + 1, size=count)
  return [tail[s:s + length] for s in starts]


def score_ours(workdir: str, windows: Sequence[str],
               batch: int = SCORE_BATCH) -> dict[str, Any]:
  """Our final checkpoint's mean next-character loss (nats) over ``windows``: the
  loss of each window's characters 2..65 given the ones before them."""
  # pylint: disable=import-outside-toplevel
  import jax
  import jax.numpy as jnp
  import numpy as np
  from jaxformer.training.saved_run import load_run
  run = load_run(workdir)
  ids = np.stack([run.tokenizer.encode_array(w) for w in windows])
  if ids.shape != (len(windows), len(windows[0])):
    raise ValueError(f"the run's tokenizer does not give one token per character "
                     f"({ids.shape})")

  @jax.jit
  def nll_sum(params, w_BL):
    logits = run.model.apply({"params": params}, w_BL[:, :-1])
    logp = jax.nn.log_softmax(logits.astype(jnp.float32))
    return -jnp.take_along_axis(logp, w_BL[:, 1:, None], axis=-1).sum()

  total = sum(float(nll_sum(run.params, ids[b:b + batch]))
              for b in range(0, len(ids), batch))
  return {"step": run.step, "loss": total / (ids.shape[0] * (ids.shape[1] - 1))}


def score_nanogpt(nano_dir: str, windows_path: str, python: str,
                  batch: int = SCORE_BATCH) -> dict[str, Any]:
  """nanoGPT's final checkpoint on the windows in ``windows_path`` (JSON), through
  its own ``model.py`` and vocabulary, with ``python`` (torch)."""
  done = subprocess.run([python, "-c", _SCORE_NANOGPT, nano_dir, windows_path,
                         str(batch)], capture_output=True, text=True, check=False)
  if done.returncode != 0:
    raise RuntimeError(f"scoring nanoGPT's checkpoint failed:\n{done.stderr[-2000:]}")
  return json.loads(done.stdout.strip().splitlines()[-1])
