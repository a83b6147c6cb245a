"""The real nanoGPT against our CLI, whole process, on the same text file, in turn.

nanoGPT is the peer: its own ``train.py`` and ``model.py`` at a named commit, run
unmodified with torch (installed only for this script; it is not a project
dependency), with its README's CPU recipe for ``shakespeare_char``. Our side is the
command a user runs, on the same file::

  python train.py config/train_shakespeare_char.py --device=cpu --compile=False \\
      --eval_iters=20 --log_interval=1 --block_size=64 --batch_size=12 --n_layer=4 \\
      --n_head=4 --n_embd=128 --max_iters=2000 --lr_decay_iters=2000 --dropout=0.0
  python -m experiments.train --config=experiments/configs/gpt_text.py \\
      --config.data.source_options.path=input.txt --config.data.tokenizer=chars \\
      --config.data.source_options.validation_fraction=0.1 --workdir=<fresh>

Both learn a character model of Tiny Shakespeare (4 x 128, 4 heads, context 64,
batch 12, 2,000 steps, lr 1e-3 warmed up 100 steps and decayed to 1e-4, beta2 0.99).
The script exports nanoGPT's tree at ``--nanogpt_commit`` from a git directory (a
clone, or the bare mirror ``fetch github:karpathy/nanoGPT`` gives) into a temporary
folder, puts the text file where ``data/shakespeare_char/prepare.py`` looks for it
(so prepare.py downloads nothing) and runs prepare.py, then alternates the two
commands ``--pairs`` times (A B A B ...), each a fresh process and a fresh output
folder. It measures each process's wall time and CPU time (user + system of the
child), and reads each side's final validation loss: nanoGPT's last ``step N: ...
val loss`` line (the mean over ``eval_iters`` random validation batches), our
``summary.json`` ``eval_loss`` (the mean over ``train.eval_batches`` fixed random
windows of the validation split). Those two readings differ by their windows alone
by about 0.015, so after each run (outside its timing) the script also scores each
side's final checkpoint, through that side's own model code and vocabulary, on the
same ``--windows`` held-out windows (:mod:`experiments.benchmarks.same_windows`); the loss target is
judged on that figure. Our CLI keeps a persistent compilation cache
(:mod:`jaxformer.compilation_cache`); with ``--cache=fresh`` (default) it starts
empty, so our first run compiles everything, as on a new machine, and the later runs
read the programs back, as a user's second run does: the table gives both ratios. It prints a table (medians over the pairs; the
wall-time ratio ours / nanoGPT of the medians and per pair) and writes it with every
raw number, the machine and its load average before and after each run to
``--out`` as ``nanogpt_vs_jaxformer-<UTC time>.json`` and ``.md``.

Run (one command; Tiny Shakespeare is char-rnn's ``data/tinyshakespeare/input.txt``,
1,115,394 bytes)::

  git clone https://github.com/karpathy/nanoGPT /tmp/nanoGPT
  curl -o /tmp/input.txt \\
      https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt
  python -m experiments.benchmarks.nanogpt_vs_jaxformer --nanogpt=/tmp/nanoGPT \\
      --input=/tmp/input.txt --pairs=2 --out=experiments/benchmarks/results

``--input`` may also be ``GITDIR:PATH`` (a file read from a git directory's HEAD, e.g.
a mirror of karpathy/char-rnn and ``data/tinyshakespeare/input.txt``). ``--steps``
shortens both runs (a smoke test; then both evaluate only at the end).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from typing import Any

from experiments.benchmarks import same_windows
from jaxformer import compilation_cache

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
# karpathy/nanoGPT master as of 2026-12 ("Update README to mention nanochat ...").
NANOGPT_COMMIT = "3adf61e154c3fe3fca428ad6bc3818b27a3b8291"
TINY_SHAKESPEARE_BYTES = 1_115_394
SIDES = ("ours", "nanogpt")


def nanogpt_command(steps: int = 2000, python: str = sys.executable) -> list[str]:
  """nanoGPT's README CPU recipe for shakespeare_char (``steps`` iterations), plus
  ``--always_save_checkpoint=True`` (a flag of its own) so that the checkpoint it
  leaves is the final one, which :func:`score_nanogpt` reads."""
  cmd = [python, "train.py", "config/train_shakespeare_char.py", "--device=cpu",
         "--compile=False", "--eval_iters=20", "--log_interval=1", "--block_size=64",
         "--batch_size=12", "--n_layer=4", "--n_head=4", "--n_embd=128",
         f"--max_iters={steps}", f"--lr_decay_iters={steps}", "--dropout=0.0",
         "--always_save_checkpoint=True"]
  if steps % 250:
    cmd.append(f"--eval_interval={steps}")   # a smoke run: evaluate at its end
  return cmd


def ours_command(input_path: str, workdir: str, steps: int = 2000,
                 python: str = sys.executable) -> list[str]:
  """Our CLI on the same file: ``gpt_text`` with the chars tokenizer, 10 % held out."""
  cmd = [python, "-m", "experiments.train",
         "--config=experiments/configs/gpt_text.py",
         f"--config.data.source_options.path={input_path}",
         "--config.data.tokenizer=chars",
         "--config.data.source_options.validation_fraction=0.1",
         f"--workdir={workdir}"]
  if steps != 2000:
    cmd += [f"--config.train.num_steps={steps}"]
    if steps % 250:
      cmd += [f"--config.train.eval_every={steps}"]
  return cmd


_EVAL = re.compile(r"^step (\d+): train loss ([0-9.]+), val loss ([0-9.]+)", re.M)
_ITER = re.compile(r"^iter (\d+): loss ([0-9.]+), time ([0-9.]+)ms", re.M)


def parse_nanogpt_log(text: str) -> dict[str, Any]:
  """nanoGPT's stdout -> evals ``[(step, train, val)]``, the final val loss, and the
  median iteration time (ms, iterations >= 10, evaluation iterations excluded)."""
  evals = [(int(s), float(t), float(v)) for s, t, v in _EVAL.findall(text)]
  eval_steps = {s for s, _, _ in evals}
  iters = [(int(i), float(ms)) for i, _, ms in _ITER.findall(text)]
  # an eval runs before iteration s's step and is timed with it: leave those out
  times = [ms for i, ms in iters if i >= 10 and i not in eval_steps]
  if not evals:
    raise ValueError("no 'step N: train loss ..., val loss ...' line in nanoGPT's "
                     "output")
  return {"evals": evals, "final_step": evals[-1][0], "val_loss": evals[-1][2],
          "iterations": len(iters),
          "ms_per_step": statistics.median(times) if times else None}


def read_ours(workdir: str) -> dict[str, Any]:
  """Our run's summary: final eval loss, step time, steps, parameters."""
  with open(os.path.join(workdir, "summary.json"), encoding="utf-8") as f:
    summary = json.load(f)
  return {"final_step": summary["step"], "val_loss": summary["eval_loss"],
          "ms_per_step": summary.get("step_time_ms"),
          "num_params": summary.get("num_params"),
          "wall_time_in_loop_s": summary.get("wall_time_s")}


def read_input(spec: str) -> bytes:
  """The text: a file, or ``GITDIR:PATH`` read from that git directory's HEAD."""
  if os.path.isfile(spec):
    return pathlib.Path(spec).read_bytes()
  gitdir, sep, path = spec.partition(":")
  if sep and os.path.isdir(gitdir):
    done = subprocess.run(["git", "-C", gitdir, "show", f"HEAD:{path}"],
                          capture_output=True, check=False)
    if done.returncode == 0:
      return done.stdout
    raise ValueError(f"--input={spec!r}: git show failed: {done.stderr.decode()[-300:]}")
  raise ValueError(f"--input={spec!r} is neither a file nor GITDIR:PATH")


def export_nanogpt(gitdir: str, commit: str, dest: str, text: bytes,
                   python: str = sys.executable) -> str:
  """nanoGPT's tree at ``commit`` in ``dest`` with the data prepared by its own
  ``data/shakespeare_char/prepare.py`` (from ``text``, no download). Returns
  ``dest``."""
  if not os.path.isdir(gitdir):
    raise ValueError(f"--nanogpt={gitdir!r} is not a directory (a git clone or mirror "
                     "of karpathy/nanoGPT)")
  archive = subprocess.run(["git", "-C", gitdir, "archive", "--format=tar", commit],
                           capture_output=True, check=False)
  if archive.returncode != 0:
    raise ValueError(f"--nanogpt={gitdir!r} --nanogpt_commit={commit}: git archive "
                     f"failed: {archive.stderr.decode()[-300:]}")
  os.makedirs(dest, exist_ok=True)
  subprocess.run(["tar", "-x", "-C", dest], input=archive.stdout, check=True)
  data = os.path.join(dest, "data", "shakespeare_char")
  pathlib.Path(data, "input.txt").write_bytes(text)
  done = subprocess.run([python, "prepare.py"], cwd=data, capture_output=True,
                        text=True, check=False)
  if done.returncode != 0:
    raise RuntimeError(f"nanoGPT's prepare.py failed:\n{done.stderr[-2000:]}")
  return dest


def run_process(cmd: Sequence[str], cwd: str, log_path: str,
                env: Mapping[str, str] | None = None) -> dict[str, Any]:
  """Runs ``cmd`` to completion; its wall time, CPU time (user + system of the child
  and its children), exit status, and the load average before and after."""
  before = resource.getrusage(resource.RUSAGE_CHILDREN)
  load_before = os.getloadavg()
  t0 = time.perf_counter()
  with open(log_path, "w", encoding="utf-8") as log:
    code = subprocess.run(list(cmd), cwd=cwd, stdout=log, stderr=subprocess.STDOUT,
                          env=None if env is None else dict(env), check=False
                          ).returncode
  wall = time.perf_counter() - t0
  after = resource.getrusage(resource.RUSAGE_CHILDREN)
  cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
  return {"returncode": code, "wall_s": wall, "cpu_s": cpu, "cores_busy": cpu / wall,
          "load_before": list(load_before), "load_after": list(os.getloadavg())}


def summarize(runs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
  """Medians per side and the ratios ours / nanoGPT (of the medians, and per pair)."""
  out: dict[str, Any] = {}
  for side in SIDES:
    rows = [r for r in runs if r["side"] == side and r["returncode"] == 0]
    out[side] = {k: (statistics.median([r[k] for r in rows if r.get(k) is not None])
                     if any(r.get(k) is not None for r in rows) else None)
                 for k in ("wall_s", "cpu_s", "cores_busy", "ms_per_step", "val_loss",
                           "common_loss")}
    out[side]["val_losses"] = [r.get("val_loss") for r in rows]
    out[side]["common_losses"] = [r.get("common_loss") for r in rows]
    out[side]["runs"] = len(rows)
  pairs = {}
  for r in runs:
    if r["returncode"] == 0:
      pairs.setdefault(r["pair"], {})[r["side"]] = r
  out["pair_wall_ratios"] = [p["ours"]["wall_s"] / p["nanogpt"]["wall_s"]
                             for _, p in sorted(pairs.items()) if len(p) == 2]
  # our first run compiles everything; the later ones read the compilation cache
  by_cache: dict[str, list[float]] = {}
  for _, p in sorted(pairs.items()):
    if len(p) == 2 and p["ours"].get("compile_cache"):
      by_cache.setdefault(p["ours"]["compile_cache"], []).append(
          p["ours"]["wall_s"] / p["nanogpt"]["wall_s"])
  out["cold_wall_ratio"] = by_cache["cold"][0] if "cold" in by_cache else None
  out["warm_wall_ratio"] = (statistics.median(by_cache["warm"]) if "warm" in by_cache
                            else None)
  o, n = out["ours"], out["nanogpt"]
  out["wall_ratio"] = (o["wall_s"] / n["wall_s"]) if o["wall_s"] and n["wall_s"] \
      else None
  out["cpu_ratio"] = (o["cpu_s"] / n["cpu_s"]) if o["cpu_s"] and n["cpu_s"] else None
  out["step_ratio"] = (o["ms_per_step"] / n["ms_per_step"]) if (
      o["ms_per_step"] and n["ms_per_step"]) else None
  for key in ("val_loss", "common_loss"):
    out[f"{key}_delta"] = (o[key] - n[key]) if (
        o[key] is not None and n[key] is not None) else None
  return out


def _f(x: Any, spec: str) -> str:
  return "—" if x is None else format(x, spec)


def markdown(results: Mapping[str, Any]) -> str:
  """The table and the runs, as markdown."""
  s, m = results["summary"], results["machine"]
  o, n = s["ours"], s["nanogpt"]
  lines = [
      f"# nanoGPT vs. jaxformer, whole process, CPU — {results['date_utc']}", "",
      f"Tiny Shakespeare ({results['input_bytes']:,} bytes), {results['steps']} steps, "
      f"{results['pairs']} pairs run in turn ({' '.join(results['order'])} ...); "
      f"nanoGPT {results['nanogpt_commit'][:12]} (torch {results['torch']}), "
      f"jaxformer {results['jaxformer_commit'][:12]} (jax {results['jax']}).", "",
      "| median | ours | nanoGPT | ours / nanoGPT |", "|---|---|---|---|",
      f"| whole-process wall time | {_f(o['wall_s'], '.1f')} s | "
      f"{_f(n['wall_s'], '.1f')} s | **{_f(s['wall_ratio'], '.3f')}** |",
      f"| whole-process CPU time | {_f(o['cpu_s'], '.1f')} s | "
      f"{_f(n['cpu_s'], '.1f')} s | {_f(s['cpu_ratio'], '.3f')} |",
      f"| cores kept busy | {_f(o['cores_busy'], '.2f')} | "
      f"{_f(n['cores_busy'], '.2f')} | |",
      f"| step time | {_f(o['ms_per_step'], '.1f')} ms | "
      f"{_f(n['ms_per_step'], '.1f')} ms | {_f(s['step_ratio'], '.3f')} |",
      f"| final validation loss, each side's own evaluation | "
      f"{_f(o['val_loss'], '.4f')} | {_f(n['val_loss'], '.4f')} | "
      f"Δ {_f(s['val_loss_delta'], '+.4f')} |",
      f"| final validation loss, the same {results['common_windows']:,} windows | "
      f"**{_f(o['common_loss'], '.4f')}** | **{_f(n['common_loss'], '.4f')}** | "
      f"**Δ {_f(s['common_loss_delta'], '+.4f')}** |", "",
      "Wall-time ratio per pair: "
      + ", ".join(f"{r:.3f}" for r in s["pair_wall_ratios"]) + "; our first run "
      f"(an empty compilation cache): {_f(s.get('cold_wall_ratio'), '.3f')}; our "
      f"later runs (the cache holds the programs), median: "
      f"{_f(s.get('warm_wall_ratio'), '.3f')}.", "",
      "| pair | side | wall s | CPU s | cores | ms/step | val loss (own) | "
      "val loss (same windows) | compilation cache | load before → after |",
      "|---|---|---|---|---|---|---|---|---|---|"]
  for r in results["runs"]:
    lines.append(
        f"| {r['pair']} | {r['side']} | {r['wall_s']:.1f} | {r['cpu_s']:.1f} | "
        f"{r['cores_busy']:.2f} | {_f(r.get('ms_per_step'), '.1f')} | "
        f"{_f(r.get('val_loss'), '.4f')} | {_f(r.get('common_loss'), '.4f')} | "
        f"{r.get('compile_cache', '—')} | {r['load_before'][0]:.2f} → "
        f"{r['load_after'][0]:.2f} |" + ("" if r["returncode"] == 0 else
                                        f" FAILED ({r['returncode']})"))
  lines += [
      "", f"Machine: {m['cpu']}, {m['nproc']} cores; load average (1, 5, 15 min) at "
      f"start {m['load_start']}, at end {m['load_end']}; Python {m['python']}.", "",
      "Step time: nanoGPT's median logged iteration time (iterations >= 10, evals "
      "excluded); ours: the loop's mean step time (compilation and evals excluded). "
      "Validation loss, own: nanoGPT's last eval (20 random batches of 12 x 64, "
      "new windows each run); ours: `eval_loss` at the last step (20 fixed random "
      "batches of 12 x 64 of the same held-out 10 %). One such 20-batch reading "
      "varies by about 0.015 with the windows alone "
      "(`results/loss-gap-cpu-2026-12-06.md`). Same windows: each side's final "
      f"checkpoint scored after its run (outside the timed process) on the same "
      f"{results['common_windows']:,} windows of 65 characters (seed "
      f"{results['window_seed']}) of the held-out tail, through its own model code "
      "and vocabulary; the loss target is judged on this row.", "",
      "Command: `" + results["command"] + "`", ""]
  return "\n".join(lines)


def _machine() -> dict[str, Any]:
  cpu = platform.processor() or platform.machine()
  try:
    for line in subprocess.run(["lscpu"], capture_output=True, text=True,
                               check=False).stdout.splitlines():
      if line.lower().startswith("model name:"):
        cpu = line.split(":", 1)[1].strip()
  except OSError:
    pass
  return {"cpu": cpu, "nproc": len(os.sched_getaffinity(0)),
          "python": platform.python_version(),
          "load_start": [round(x, 2) for x in os.getloadavg()]}


def _version(python: str, module: str) -> str | None:
  done = subprocess.run([python, "-c", f"import {module}; print({module}.__version__)"],
                        capture_output=True, text=True, check=False)
  return done.stdout.strip() or None


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog="python -m experiments.benchmarks.nanogpt_vs_jaxformer",
                              description=__doc__.split("\n\n")[0])
  p.add_argument("--nanogpt", required=True,
                 help="a git clone or mirror of karpathy/nanoGPT")
  p.add_argument("--nanogpt_commit", default=NANOGPT_COMMIT)
  p.add_argument("--input", required=True,
                 help="Tiny Shakespeare: a file, or GITDIR:PATH in a git directory")
  p.add_argument("--pairs", type=int, default=2)
  p.add_argument("--steps", type=int, default=2000)
  p.add_argument("--cache", choices=("fresh", "user"), default="fresh",
                 help="our compilation cache: a new empty folder (our first run "
                 "compiles, later ones read it) or the user's own")
  p.add_argument("--windows", type=int, default=same_windows.COMMON_WINDOWS,
                 help="held-out windows both final checkpoints are scored on")
  p.add_argument("--first", choices=SIDES, default="nanogpt",
                 help="which side runs first in each pair")
  p.add_argument("--out", required=True, help="folder for the .json and .md")
  p.add_argument("--nanogpt_python", default=sys.executable,
                 help="the Python with torch that runs nanoGPT")
  args = p.parse_args(argv)
  for name in ("pairs", "steps", "windows"):
    if getattr(args, name) < 1:
      p.error(f"--{name}={getattr(args, name)} must be >= 1")
  return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  args = parse_args(argv)
  text = read_input(args.input)
  if len(text) != TINY_SHAKESPEARE_BYTES:
    print(f"note: --input has {len(text):,} bytes, not Tiny Shakespeare's "
          f"{TINY_SHAKESPEARE_BYTES:,}", flush=True)
  torch_version = _version(args.nanogpt_python, "torch")
  if torch_version is None:
    raise SystemExit(f"torch is not importable by {args.nanogpt_python} (nanoGPT needs "
                     "it: pip install torch; it is not a project dependency)")
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  scratch = tempfile.mkdtemp(prefix="nanogpt_vs_jaxformer_")
  machine = _machine()
  try:
    nano_dir = export_nanogpt(args.nanogpt, args.nanogpt_commit,
                              os.path.join(scratch, "nanoGPT"), text,
                              args.nanogpt_python)
    input_path = os.path.join(scratch, "input.txt")
    pathlib.Path(input_path).write_bytes(text)
    windows = same_windows.common_windows(text, args.windows)
    windows_path = os.path.join(scratch, "windows.json")
    pathlib.Path(windows_path).write_text(json.dumps(windows), encoding="utf-8")
    order = [args.first, next(s for s in SIDES if s != args.first)]
    runs = []
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    if args.cache == "fresh":   # cold for our first run, as on a new machine
      env[compilation_cache.ENV] = os.path.join(scratch, "jax_cache")
    for pair in range(1, args.pairs + 1):
      for side in order:
        log = os.path.join(scratch, f"{side}-{pair}.log")
        if side == "nanogpt":
          shutil.rmtree(os.path.join(nano_dir, "out-shakespeare-char"),
                        ignore_errors=True)
          cmd = nanogpt_command(args.steps, args.nanogpt_python)
          row = run_process(cmd, nano_dir, log)
        else:
          workdir = os.path.join(scratch, f"ours-{pair}")
          cmd = ours_command(input_path, workdir, args.steps)
          row = run_process(cmd, str(REPO_ROOT), log, env)
          if args.cache == "fresh":
            row["compile_cache"] = "cold" if pair == 1 else "warm"
        row.update(side=side, pair=pair)
        if row["returncode"] == 0:
          if side == "nanogpt":
            row.update(parse_nanogpt_log(pathlib.Path(log).read_text()))
            scored = same_windows.score_nanogpt(nano_dir, windows_path,
                                                args.nanogpt_python)
          else:
            row.update(read_ours(workdir))
            scored = same_windows.score_ours(workdir, windows)
          row.update(common_loss=scored["loss"], common_step=scored["step"])
        else:
          row["log_tail"] = pathlib.Path(log).read_text()[-3000:]
        runs.append(row)
        print(f"[pair {pair}] {side}: wall {row['wall_s']:.1f} s, cpu "
              f"{row['cpu_s']:.1f} s, val loss {_f(row.get('val_loss'), '.4f')} "
              f"(same windows {_f(row.get('common_loss'), '.4f')}), "
              f"load {row['load_before'][0]:.2f} -> {row['load_after'][0]:.2f}"
              + ("" if row["returncode"] == 0 else
                 f" FAILED ({row['returncode']}):\n{row['log_tail']}"), flush=True)
  finally:
    shutil.rmtree(scratch, ignore_errors=True)
  machine["load_end"] = [round(x, 2) for x in os.getloadavg()]
  head = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"],
                        capture_output=True, text=True, check=False).stdout.strip()
  results = {
      "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(
          timespec="seconds"),
      "command": "python -m experiments.benchmarks.nanogpt_vs_jaxformer " + " ".join(
          sys.argv[1:] if argv is None else argv),
      "nanogpt_commit": args.nanogpt_commit, "jaxformer_commit": head or "unknown",
      "input_bytes": len(text), "steps": args.steps, "pairs": args.pairs,
      "common_windows": args.windows, "window_seed": same_windows.WINDOW_SEED,
      "compile_cache": args.cache,
      "order": order, "machine": machine, "torch": torch_version,
      "jax": _version(sys.executable, "jax"),
      "nanogpt_command": " ".join(nanogpt_command(args.steps, "python")),
      "ours_command": " ".join(ours_command("input.txt", "<fresh>", args.steps,
                                            "python")),
      "runs": runs, "summary": summarize(runs)}
  report = markdown(results)
  print("\n" + report, flush=True)
  stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
  (out / f"nanogpt_vs_jaxformer-{stamp}.json").write_text(
      json.dumps(results, indent=1) + "\n", encoding="utf-8")
  (out / f"nanogpt_vs_jaxformer-{stamp}.md").write_text(report, encoding="utf-8")
  print(f"wrote {out}/nanogpt_vs_jaxformer-{stamp}.{{json,md}}", flush=True)
  return results


if __name__ == "__main__":
  main()
