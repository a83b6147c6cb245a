"""nanoGPT (PyTorch) vs. jaxformer's GPT on the CPU: same model, same batches (the
harness; the PyTorch model and trainer are :mod:`experiments.benchmarks.nanogpt_torch`).

The project's bar: PyTorch nanoGPT at 4 layers x 128 wide, 4 heads, context 64, batch 12
trains at about 32 ms/step on a 2-core CPU and reaches a validation loss of about 1.88
on character-level Shakespeare in 2,000 steps; jaxformer's GPT must be no slower and
learn no worse. Shakespeare is not available offline, so both trainers here see the
SAME data and the SAME batches: the embedded default data set (the Python standard
library's source, byte-level, :mod:`jaxformer.data.embedded`) through the project's own
pipeline (``jaxformer.tasks.CausalLM.batches``, train and eval, with the
config's data section and seed), so every train and eval batch is identical by
construction.

Run (on a quiet machine; the full comparison takes a few minutes per side)::

  python -m experiments.benchmarks.nanogpt_cpu --steps 2000 \\
      --out experiments/benchmarks/results

  # a smoke run (timings meaningless on a busy machine):
  python -m experiments.benchmarks.nanogpt_cpu --steps 30 --eval_every 15 --out /tmp/nb

The two sides:

* **PyTorch**: a faithful re-implementation of Karpathy's nanoGPT ``model.py`` (pre-LN
  blocks, exact-erf GELU MLP 4x, learned positions, tied embeddings, biases,
  ``F.scaled_dot_product_attention(is_causal=True)``, dropout 0, init normal(0.02) and
  normal(0.02 / sqrt(2 n_layer)) for both ``c_proj`` weights) and of ``train.py``'s loop
  (AdamW with weight decay on >= 2-D parameters only, nanoGPT's ``get_lr``: linear
  warmup ``lr (it+1) / (warmup+1)`` then cosine to ``min_lr`` at the last step, grad
  clip, float32, ``torch.set_num_threads(2)``, ``torch.manual_seed(1337)``). Hyper-
  parameters are read from the same config file as ours (``gpt_bytes.py``):
  ``min_lr = learning_rate * end_lr_fraction``. Differences from nanoGPT, all forced by
  feeding the same packed batches: the loss is the ``weights``-weighted mean
  cross-entropy (identical to ours; the weights are 0 only on padding, which the
  endless training stream almost never has), and the batches come from our pipeline
  instead of random 64-byte windows. By default (``--torch_attention causal``) the
  torch model ignores ``segment_ids``/``positions``, exactly like nanoGPT: positions
  are ``arange(L)`` and a row that holds the end of one document and the start of the
  next attends across the boundary (rows are contiguous 64-token chunks of one
  document stream, so this happens about once per document, i.e. rarely).
  ``--torch_attention segments`` instead feeds the batch's positions and a
  causal-and-same-segment mask (the exact function our GPT computes, at the cost of
  SDPA's ``is_causal`` fast path).
* **jaxformer**: ``python -m experiments.train
  --config=experiments/configs/gpt_bytes.py`` in a subprocess with ``num_steps``,
  ``log_every``, ``eval_every``, ``eval_batches`` overridden, checkpoints only at the
  end, TensorBoard and the final sample off; its ``metrics.jsonl`` and
  ``summary.json`` are read back.

What is measured, the same way for both: ms/step = median over ``--log_every``-step
windows of the mean step time (data fetch + forward + backward + update, i.e. what
``experiments.train`` logs), excluding the first window (compilation / warm-up) and
all evaluation time; tokens/s = batch x length / (ms/step); the validation loss
(nats per token) on the same ``eval_batches`` held-out batches (default 20, nanoGPT's
``eval_iters``: the first 20 batches of the unshuffled validation split, the same
batches at every evaluation; nanoGPT draws 20 random ones instead) at every
``eval_every`` steps and at the end; parameter counts (all parameters, tied embedding
counted once, position table included; nanoGPT's own ``get_num_params`` leaves the
position table out). Known differences between the two models that the config cannot
express (reported, not hidden): ours uses the tanh-approximate GELU, plain normal(0.02)
for the output projections, and no weight decay on the embedding tables.

Results go to ``--out`` as ``nanogpt_cpu-<UTC time>.json`` and ``.md`` with the date,
CPU model, core count, load average and the torch / jax versions. Without torch the
PyTorch side is skipped with a message (torch is not a project dependency:
``pip install torch`` with a CPU wheel).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import pathlib
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from experiments.benchmarks.nanogpt_torch import Batch
from experiments.benchmarks.nanogpt_torch import NanoGPTConfig
from experiments.benchmarks.nanogpt_torch import TORCH_ATTENTION
from experiments.benchmarks.nanogpt_torch import TrainSettings
from experiments.benchmarks.nanogpt_torch import torch
from experiments.benchmarks.nanogpt_torch import torch_available
from experiments.benchmarks.nanogpt_torch import train_torch

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
DEFAULT_CONFIG = "experiments/configs/gpt_bytes.py"
SIDES = ("torch", "ours")
# The bar, from nanoGPT's README (shakespeare_char, CPU): for context only; the loss is
# on other data and is not comparable to the losses measured here.
NANOGPT_REFERENCE = {"ms_per_step": 32.0, "tokens_per_sec": 24_000,
                     "val_loss_shakespeare_char": 1.88}



# --- configuration --------------------------------------------------------------------


def load_config(spec: str = DEFAULT_CONFIG) -> Any:
  """``get_config(arg)`` of a config file; ``spec`` is ``path[:arg]`` as for the CLI."""
  path, _, arg = spec.partition(":")
  full = pathlib.Path(path)
  if not full.is_absolute():
    full = REPO_ROOT / full
  if not full.is_file():
    raise ValueError(f"config={spec!r}: no file {full}")
  module_spec = importlib.util.spec_from_file_location("_nanogpt_cpu_config", full)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg or None)


# --- statistics -----------------------------------------------------------------------


def window_means(step_ms: Sequence[float], window: int) -> list[float]:
  """Mean step time of consecutive ``window``-step blocks (the last may be shorter)."""
  if window < 1:
    raise ValueError(f"window={window!r} must be >= 1")
  return [statistics.fmean(step_ms[i:i + window])
          for i in range(0, len(step_ms), window)]


def timing_summary(window_ms: Sequence[float], *, tokens_per_step: int,
                   skip_windows: int = 1) -> dict[str, float | None]:
  """``ms_per_step`` (median window after ``skip_windows``) and ``tokens_per_sec``."""
  kept = list(window_ms[skip_windows:]) or list(window_ms)
  if not kept:
    return {"ms_per_step": None, "tokens_per_sec": None, "ms_per_step_min": None,
            "ms_per_step_max": None, "windows": 0}
  ms = statistics.median(kept)
  return {"ms_per_step": ms, "tokens_per_sec": 1000.0 * tokens_per_step / ms,
          "ms_per_step_min": min(kept), "ms_per_step_max": max(kept),
          "windows": len(kept)}


def summarize_torch(result: Mapping[str, Any], *, tokens_per_step: int,
                    log_every: int) -> dict[str, Any]:
  """The torch side's row of the comparison."""
  step_ms = result["step_ms"]
  out = timing_summary(window_means(step_ms, log_every),
                       tokens_per_step=tokens_per_step)
  timed = step_ms[log_every:] or step_ms
  out.update(
      num_params=result["num_params"],
      ms_per_step_single_median=statistics.median(timed) if timed else None,
      ms_per_step_mean=statistics.fmean(timed) if timed else None,
      final_train_loss=result["losses"][-1] if result["losses"] else None,
      final_eval_loss=result["evals"][-1]["eval_loss"] if result["evals"] else None,
      evals=list(result["evals"]), steps=len(step_ms),
      wall_time_s=result["wall_time_s"])
  return out


def read_jsonl(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


def summarize_ours(rows: Sequence[Mapping[str, Any]], summary: Mapping[str, Any], *,
                   tokens_per_step: int) -> dict[str, Any]:
  """Our side's row, from ``metrics.jsonl`` rows and ``summary.json``.

  Train rows (``step_time_ms`` = mean over the steps since the previous log row; the
  loop restarts that clock after compilation and after every eval) give the windows;
  eval rows (``eval_loss``) the curve.
  """
  train = [r for r in rows if "step_time_ms" in r and "eval_loss" not in r]
  evals = [{"step": int(r["step"]), "eval_loss": float(r["eval_loss"])}
           for r in rows if "eval_loss" in r]
  out = timing_summary([float(r["step_time_ms"]) for r in train],
                       tokens_per_step=tokens_per_step)
  out.update(
      num_params=summary.get("num_params"),
      ms_per_step_mean=summary.get("step_time_ms"),
      final_train_loss=train[-1]["loss"] if train and "loss" in train[-1] else
      summary.get("loss"),
      final_eval_loss=evals[-1]["eval_loss"] if evals else summary.get("eval_loss"),
      evals=evals, steps=summary.get("step"),
      wall_time_s=summary.get("wall_time_s"))
  return out


# --- the two sides --------------------------------------------------------------------


def data_iterators(config: Any) -> tuple[Iterator[Batch], list[Batch]]:
  """Our training stream and fixed eval batches, exactly as ``experiments.train``."""
  from jaxformer import tasks  # pylint: disable=g-import-not-at-top
  from jaxformer.data import vocab  # pylint: disable=g-import-not-at-top
  data = config["data"]
  task = tasks.build_task(config, tokenizer=vocab.build_tokenizer(data))
  train_it = task.batches(batch_size=data["batch_size"], seed=config["train"]["seed"],
                          train=True)
  eval_it = task.batches(batch_size=data["eval_batch_size"], seed=0, train=False)
  eval_batches = [next(eval_it) for _ in range(config["train"]["eval_batches"])]
  getattr(eval_it, "close", lambda: None)()
  return train_it, eval_batches


def ours_param_count(config: Any) -> int:
  """Our GPT's parameter count for ``config.model`` (shape-only init, no FLOPs)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from jaxformer.models import registry  # pylint: disable=g-import-not-at-top
  cfg, model = registry.build_model(config["model"])
  shapes = jax.eval_shape(model.init, jax.random.key(0),
                          jnp.zeros((1, config["data"]["seq_len"]), jnp.int32))
  return registry.num_params(cfg, shapes["params"])  # without vocabulary padding


def ours_command(config_spec: str, workdir: str, *, steps: int, log_every: int,
                 eval_every: int, eval_batches: int,
                 extra: Sequence[str] = ()) -> list[str]:
  """The ``experiments.train`` command line for our side."""
  return [sys.executable, "-m", "experiments.train", f"--config={config_spec}",
          f"--workdir={workdir}", f"--config.train.num_steps={steps}",
          f"--config.train.log_every={log_every}",
          f"--config.train.eval_every={eval_every}",
          f"--config.train.eval_batches={eval_batches}",
          f"--config.train.checkpoint_every={steps}",
          "--config.train.tensorboard=False", "--config.task_options.sample_tokens=0",
          "--config.train.progress=False", *extra]


def ours_available() -> str | None:
  """None if ``experiments.train`` can run here, else why not."""
  for module in ("experiments.train", "jaxformer.training.loop"):
    try:
      if importlib.util.find_spec(module) is None:
        return f"{module} does not exist yet"
    except ImportError as e:
      return f"{module} cannot be found: {e}"
  return None


def run_ours(cmd: Sequence[str], workdir: str, *, log_path: str | None = None
             ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
  """Runs our trainer; returns its metrics rows and summary (RuntimeError if it
  fails)."""
  if os.path.exists(os.path.join(workdir, "checkpoints")):
    raise ValueError(f"ours workdir {workdir!r} already has checkpoints (the run would "
                     "resume); give a fresh directory")
  lines: list[str] = []
  with subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=subprocess.PIPE,
                        stderr=subprocess.STDOUT, text=True, bufsize=1) as proc:
    for line in proc.stdout:
      lines.append(line)
      print("[ours] " + line, end="", flush=True)
    code = proc.wait()
  if log_path:
    with open(log_path, "w", encoding="utf-8") as f:
      f.writelines(lines)
  if code != 0:
    tail = "".join(lines[-30:])
    raise RuntimeError(f"experiments.train exited with status {code}:\n{tail}")
  rows = read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  with open(os.path.join(workdir, "summary.json"), encoding="utf-8") as f:
    summary = json.load(f)
  return rows, summary


# --- report ---------------------------------------------------------------------------


def system_info() -> dict[str, Any]:
  """Date, CPU model, cores, load, library versions."""
  cpu = platform.processor() or platform.machine()
  try:
    out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    for line in out.splitlines():
      if line.lower().startswith("model name:"):
        cpu = line.split(":", 1)[1].strip()
        break
  except OSError:
    pass
  info = {"date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(
              timespec="seconds"),
          "cpu": cpu, "nproc": len(os.sched_getaffinity(0))
          if hasattr(os, "sched_getaffinity") else os.cpu_count(),
          "load_avg_1_5_15": (list(os.getloadavg()) if hasattr(os, "getloadavg")
                              else None),
          "python": platform.python_version(),
          "torch": torch.__version__ if torch is not None else None}
  for name in ("jax", "jaxlib", "flax", "optax", "numpy"):
    try:
      info[name] = __import__(name).__version__
    except ImportError:
      info[name] = None
  return info


def _fmt(value: Any, spec: str) -> str:
  return "—" if value is None else format(value, spec)


def verdict(torch_row: Mapping[str, Any] | None, ours_row: Mapping[str, Any] | None, *,
            speed_tolerance: float, loss_tolerance: float) -> dict[str, Any]:
  """Whether ours is no slower (ms ratio <= 1 + tol) and learns no worse (loss delta
  <= tol); None where a side or a number is missing."""
  out: dict[str, Any] = {"speed_tolerance": speed_tolerance,
                         "loss_tolerance": loss_tolerance, "speed_ratio": None,
                         "loss_delta": None, "no_slower": None, "no_worse": None}
  if not torch_row or not ours_row:
    return out
  if torch_row.get("ms_per_step") and ours_row.get("ms_per_step"):
    out["speed_ratio"] = ours_row["ms_per_step"] / torch_row["ms_per_step"]
    out["no_slower"] = out["speed_ratio"] <= 1.0 + speed_tolerance
  if torch_row.get("final_eval_loss") is not None and (
      ours_row.get("final_eval_loss") is not None):
    out["loss_delta"] = ours_row["final_eval_loss"] - torch_row["final_eval_loss"]
    out["no_worse"] = out["loss_delta"] <= loss_tolerance
  return out


def markdown_report(results: Mapping[str, Any]) -> str:
  """The results as a markdown page (table, eval curves, setup, caveats)."""
  rows = results["sides"]
  t, o = rows.get("torch") or {}, rows.get("ours") or {}
  s, sysinfo = results["settings"], results["system"]
  v = results["verdict"]
  lines = [
      f"# nanoGPT (PyTorch) vs. jaxformer GPT on the CPU — {sysinfo['date_utc']}", "",
      f"{s['steps']} steps, batch {s['batch_size']} x {s['seq_len']} "
      f"({s['tokens_per_step']} tokens/step), data: {s['data']}, same batches for "
      f"both; eval: the same {s['eval_batches']} held-out batches, every "
      f"{s['eval_every']} steps; torch attention mode: `{s['torch_attention']}`.", "",
      f"| | PyTorch nanoGPT | jaxformer GPT | jaxformer / torch |",
      "|---|---|---|---|"]

  def ratio(a, b):
    return f"{a / b:.3f}" if a and b else "—"

  lines += [
      f"| parameters | {_fmt(t.get('num_params'), ',')} | "
      f"{_fmt(o.get('num_params'), ',')} | — |",
      f"| ms/step (median of {s['log_every']}-step windows) | "
      f"{_fmt(t.get('ms_per_step'), '.2f')} | {_fmt(o.get('ms_per_step'), '.2f')} | "
      f"{ratio(o.get('ms_per_step'), t.get('ms_per_step'))} |",
      f"| tokens/s | {_fmt(t.get('tokens_per_sec'), ',.0f')} | "
      f"{_fmt(o.get('tokens_per_sec'), ',.0f')} | "
      f"{ratio(o.get('tokens_per_sec'), t.get('tokens_per_sec'))} |",
      f"| ms/step (mean, all timed steps) | {_fmt(t.get('ms_per_step_mean'), '.2f')} | "
      f"{_fmt(o.get('ms_per_step_mean'), '.2f')} | "
      f"{ratio(o.get('ms_per_step_mean'), t.get('ms_per_step_mean'))} |",
      f"| final eval loss (nats/token) | {_fmt(t.get('final_eval_loss'), '.4f')} | "
      f"{_fmt(o.get('final_eval_loss'), '.4f')} | "
      f"Δ {_fmt(v.get('loss_delta'), '+.4f')} |",
      f"| final train loss (last batch) | {_fmt(t.get('final_train_loss'), '.4f')} | "
      f"{_fmt(o.get('final_train_loss'), '.4f')} | — |",
      f"| wall time (s) | {_fmt(t.get('wall_time_s'), '.1f')} | "
      f"{_fmt(o.get('wall_time_s'), '.1f')} | — |", ""]

  def yes_no(x):
    return "—" if x is None else ("yes" if x else "NO")

  lines += [f"- no slower (ms/step ratio <= {1 + v['speed_tolerance']:.2f}): "
            f"**{yes_no(v['no_slower'])}**",
            f"- learns no worse (eval loss Δ <= {v['loss_tolerance']}): "
            f"**{yes_no(v['no_worse'])}**", ""]
  steps = sorted({e["step"] for side in (t, o) for e in side.get("evals", [])})
  if steps:
    lines += ["| step | torch eval loss | jaxformer eval loss |", "|---|---|---|"]
    te = {e["step"]: e["eval_loss"] for e in t.get("evals", [])}
    oe = {e["step"]: e["eval_loss"] for e in o.get("evals", [])}
    lines += [f"| {k} | {_fmt(te.get(k), '.4f')} | {_fmt(oe.get(k), '.4f')} |"
              for k in steps]
    lines.append("")
  lines += [
      f"Machine: {sysinfo['cpu']}, {sysinfo['nproc']} cores, load average at start "
      f"{sysinfo['load_avg_1_5_15']}; Python {sysinfo['python']}, torch "
      f"{sysinfo['torch']}, jax {sysinfo['jax']}, flax {sysinfo['flax']}; torch "
      f"threads {s['threads']}.", ""]
  lines += [f"- {note}" for note in results.get("notes", [])]
  lines += ["", "Reference (nanoGPT README, shakespeare_char — other data, loss not "
            f"comparable): ≈{NANOGPT_REFERENCE['ms_per_step']:.0f} ms/step, "
            f"val loss ≈{NANOGPT_REFERENCE['val_loss_shakespeare_char']}.",
            "", "Command: `" + results["command"] + "`", ""]
  return "\n".join(lines)


# --- main -----------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(
      prog="python -m experiments.benchmarks.nanogpt_cpu",
      description=__doc__.split("\n\n")[0])
  p.add_argument("--config", default=DEFAULT_CONFIG,
                 help="our config file (path[:arg]); both sides use its numbers")
  p.add_argument("--steps", type=int, default=2000)
  p.add_argument("--out", default="experiments/benchmarks/results",
                 help="directory for nanogpt_cpu-<time>.json/.md")
  p.add_argument("--log_every", type=int, default=10,
                 help="window length for the step-time median")
  p.add_argument("--eval_every", type=int, default=None,
                 help="default: the config's train.eval_every")
  p.add_argument("--eval_batches", type=int, default=None,
                 help="held-out batches per eval; default: the config's (20)")
  p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
  p.add_argument("--torch_attention", choices=TORCH_ATTENTION, default="causal")
  p.add_argument("--sides", default="torch,ours",
                 help="comma-separated subset of torch,ours")
  p.add_argument("--ours_workdir", default=None,
                 help="workdir for experiments.train (default: a temporary one)")
  p.add_argument("--ours_override", action="append", default=[],
                 help="extra flag for experiments.train, e.g. "
                      "--ours_override=--config.model.block.attention_impl=xla")
  p.add_argument("--speed_tolerance", type=float, default=0.05)
  p.add_argument("--loss_tolerance", type=float, default=0.02)
  args = p.parse_args(argv)
  sides = tuple(x.strip() for x in args.sides.split(",") if x.strip())
  bad = [x for x in sides if x not in SIDES]
  if bad or not sides:
    p.error(f"--sides={args.sides!r}: each must be one of {SIDES}")
  args.sides = sides
  for name in ("steps", "log_every", "threads"):
    if getattr(args, name) < 1:
      p.error(f"--{name}={getattr(args, name)} must be >= 1")
  return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  args = parse_args(argv)
  config = load_config(args.config)
  eval_every = args.eval_every or config.train.eval_every
  eval_batches = args.eval_batches or config.train.eval_batches
  with config.unlocked():
    config.train.num_steps = args.steps
    config.train.eval_every = eval_every
    config.train.eval_batches = eval_batches
  data = config.data
  tokens_per_step = data.batch_size * data.seq_len
  system = system_info()
  load1 = (system["load_avg_1_5_15"] or [0.0])[0]
  notes = [
      "ms/step: median over log_every-step windows of (batch fetch + forward + "
      "backward + update), first window (compile / warm-up) and evals excluded.",
      "Eval: the first eval_batches batches of the unshuffled validation split of "
      "the embedded data set, identical for both sides and at every eval.",
      "Known model differences: ours uses tanh-GELU (nanoGPT: exact) and no weight "
      "decay on embeddings (nanoGPT decays every >= 2-D parameter); both scale the "
      "residual output projections' init to 0.02/sqrt(2 n_layer).",
      "The torch side uses biases (as our config); nanoGPT's train.py default is "
      "bias=False."]
  if args.steps < 10 * config.optimizer.warmup_steps:
    notes.append("Short run: ours clamps warmup to min(warmup_steps, num_steps) and "
                 "decays over num_steps; nanoGPT's get_lr does the same decay but not "
                 "the clamp, so losses of runs much shorter than the full 2000 steps "
                 "are not comparable.")
  if args.torch_attention == "causal":
    notes.append("Torch ignores segment_ids/positions (nanoGPT: is_causal=True, "
                 "positions arange(L)); ours keeps attention inside documents.")
  if load1 > 0.5:
    msg = (f"WARNING: load average {load1:.2f} at start: other work is running, "
           "timings are unreliable.")
    print(msg, flush=True)
    notes.append(msg)

  sides: dict[str, Any] = {}
  errors: dict[str, str] = {}
  if "torch" in args.sides:
    if not torch_available():
      errors["torch"] = "torch is not installed: PyTorch side skipped"
      print("[torch] " + errors["torch"], flush=True)
    else:
      model_cfg = NanoGPTConfig.from_model_section(config.model)
      settings = TrainSettings.from_config(
          config, steps=args.steps, log_every=args.log_every, eval_every=eval_every,
          threads=args.threads, attention=args.torch_attention)
      train_it, evals = data_iterators(config)
      print(f"[torch] nanoGPT {model_cfg}, {settings}", flush=True)
      try:
        result = train_torch(model_cfg, settings, train_it, evals)
      finally:
        getattr(train_it, "close", lambda: None)()  # stop its prefetch thread
      sides["torch"] = summarize_torch(result, tokens_per_step=tokens_per_step,
                                       log_every=args.log_every)
  if "ours" in args.sides:
    why_not = ours_available()
    if why_not:
      errors["ours"] = f"jaxformer side skipped: {why_not}"
      print("[ours] " + errors["ours"], flush=True)
    else:
      workdir = args.ours_workdir or tempfile.mkdtemp(prefix="nanogpt_cpu_ours_")
      cmd = ours_command(args.config, workdir, steps=args.steps,
                         log_every=args.log_every, eval_every=eval_every,
                         eval_batches=eval_batches, extra=args.ours_override)
      print("[ours] " + " ".join(cmd), flush=True)
      try:
        rows, summary = run_ours(cmd, workdir,
                                 log_path=os.path.join(workdir, "train.log"))
        sides["ours"] = summarize_ours(rows, summary, tokens_per_step=tokens_per_step)
      except (RuntimeError, OSError, ValueError) as e:
        errors["ours"] = f"jaxformer side failed: {e}"
        print("[ours] " + errors["ours"], flush=True)
      finally:
        if args.ours_workdir is None:
          shutil.rmtree(workdir, ignore_errors=True)
  if "ours" in sides and not sides["ours"].get("num_params"):
    sides["ours"]["num_params"] = ours_param_count(config)

  notes += [f"{k}: {v}" for k, v in errors.items()]
  results = {
      "command": "python -m experiments.benchmarks.nanogpt_cpu " + " ".join(
          sys.argv[1:] if argv is None else argv),
      "system": system,
      "settings": {"config": args.config, "steps": args.steps,
                   "batch_size": data.batch_size, "seq_len": data.seq_len,
                   "tokens_per_step": tokens_per_step,
                   "data": f"{data.source} ({data.tokenizer} tokenizer)",
                   "eval_every": eval_every, "eval_batches": eval_batches,
                   "log_every": args.log_every, "threads": args.threads,
                   "torch_attention": args.torch_attention},
      "sides": sides, "errors": errors,
      "verdict": verdict(sides.get("torch"), sides.get("ours"),
                         speed_tolerance=args.speed_tolerance,
                         loss_tolerance=args.loss_tolerance),
      "notes": notes,
  }
  report = markdown_report(results)
  print("\n" + report, flush=True)
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
  (out / f"nanogpt_cpu-{stamp}.json").write_text(json.dumps(results, indent=2) + "\n",
                                                  encoding="utf-8")
  (out / f"nanogpt_cpu-{stamp}.md").write_text(report, encoding="utf-8")
  print(f"wrote {out / f'nanogpt_cpu-{stamp}'}.{{json,md}}", flush=True)
  return results


if __name__ == "__main__":
  main()
