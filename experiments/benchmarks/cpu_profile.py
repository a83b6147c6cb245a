"""Where a CPU training step's time goes: the real loop, profiled, and its parts timed.

Runs ``experiments.train``'s loop (:func:`jaxformer.training.loop.train`) on a config
(default ``gpt_bytes``) in this process and records steps ``--from_step`` to
``--to_step`` with ``jax.profiler.trace`` (a Perfetto trace: ``perfetto_trace.json.gz``
under ``--out``, open it at ui.perfetto.dev). The trace is then read back and summed
per thread: busy seconds of each XLA device thread, of the Python main thread and of
the data prefetch thread, over the traced wall time, i.e. how many of the cores were
kept busy and by what. It also times, outside the loop, one batch of the data
pipeline (``task.batches``) and the host read of a step's metrics.

  python -m experiments.benchmarks.cpu_profile --out /tmp/cpu_profile
  python -m experiments.benchmarks.cpu_profile --out /tmp/p1 \\
      --override=--config.sharding.cpu_devices=0        # one CPU device

The findings on this project's 2-core machine are in
``experiments/benchmarks/cpu_profile.md``.
"""

from __future__ import annotations

import argparse
import ast
import collections
import gzip
import importlib.util
import json
import os
import pathlib
import statistics
import tempfile
import time
from collections.abc import Sequence
from typing import Any


def _config(spec: str, overrides: Sequence[str]) -> Any:
  """``get_config`` of ``path[:arg]`` with ``--config.a.b=value`` overrides."""
  path, _, arg = spec.partition(":")
  module_spec = importlib.util.spec_from_file_location("_cpu_profile_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  config = module.get_config(arg or None)
  for item in overrides:
    key, _, text = item.removeprefix("--config.").partition("=")
    try:
      value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      value = text
    *parents, leaf = key.split(".")
    section = config
    for name in parents:
      section = section[name]
    section[leaf] = value
  return config


# Events that are a thread waiting, not working (on another thread, a lock, a queue,
# the other device at a collective's rendezvous).
WAITS = ("wait", "rendezvous", "acquire", "queue.py", "sleep")


def _union(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
  out: list[tuple[float, float]] = []
  for s, t in sorted(intervals):
    if out and s <= out[-1][1]:
      out[-1] = (out[-1][0], max(out[-1][1], t))
    else:
      out.append((s, t))
  return out


def _length(intervals: list[tuple[float, float]]) -> float:
  return sum(t - s for s, t in intervals)


def _overlap(a: list[tuple[float, float]], b: list[tuple[float, float]]) -> float:
  total, j = 0.0, 0
  for s, t in a:
    while j < len(b) and b[j][1] <= s:
      j += 1
    k = j
    while k < len(b) and b[k][0] < t:
      total += min(t, b[k][1]) - max(s, b[k][0])
      k += 1
  return total


def thread_busy(trace_path: str | os.PathLike[str]) -> dict[str, Any]:
  """Per-thread time of a Perfetto/Chrome trace, in seconds: ``traced`` (the union of
  the thread's complete events), ``waiting`` (inside events named like a wait:
  :data:`WAITS`) and ``working`` (traced minus waiting), with the thread's largest
  events by total duration; and the traced span."""
  with gzip.open(trace_path, "rt", encoding="utf-8") as f:
    trace = json.load(f)
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  names: dict[tuple[int, int], str] = {}
  spans: dict[tuple[int, int], list[tuple[float, float]]] = collections.defaultdict(list)
  waits: dict[tuple[int, int], list[tuple[float, float]]] = collections.defaultdict(list)
  top: dict[tuple[int, int], collections.Counter] = collections.defaultdict(
      collections.Counter)
  for e in events:
    key = (e.get("pid", 0), e.get("tid", 0))
    if e.get("ph") == "M" and e.get("name") == "thread_name":
      names[key] = e["args"]["name"]
    elif e.get("ph") == "X" and "dur" in e:
      span = (float(e["ts"]), float(e["ts"]) + float(e["dur"]))
      spans[key].append(span)
      if any(w in e.get("name", "").lower() for w in WAITS):
        waits[key].append(span)
      top[key][e.get("name", "?")] += float(e["dur"])
  if not spans:
    return {"span_s": 0.0, "threads": []}
  t0 = min(s for v in spans.values() for s, _ in v)
  t1 = max(t for v in spans.values() for _, t in v)
  rows = []
  for key, intervals in spans.items():
    traced = _union(intervals)
    waiting = _overlap(traced, _union(waits[key]))
    rows.append({"thread": names.get(key, str(key)), "traced_s": _length(traced) / 1e6,
                 "waiting_s": waiting / 1e6,
                 "working_s": (_length(traced) - waiting) / 1e6,
                 "events": len(intervals),
                 "top": [(n, d / 1e6) for n, d in top[key].most_common(6)]})
  rows.sort(key=lambda r: -r["working_s"])
  return {"span_s": (t1 - t0) / 1e6, "threads": rows}


def time_pipeline(config: Any, batches: int = 200) -> dict[str, float]:
  """Seconds per batch of the training pipeline on the main thread (no prefetch)."""
  from jaxformer import tasks  # pylint: disable=g-import-not-at-top
  from jaxformer.data import vocab  # pylint: disable=g-import-not-at-top
  with config.unlocked():
    config.data.prefetch = 0
  workdir = tempfile.mkdtemp(prefix="cpu_profile_tok_")
  task = tasks.build_task(config, tokenizer=vocab.build_tokenizer(config.data, workdir))
  it = task.batches(batch_size=config.data.batch_size, seed=0, train=True)
  next(it)
  t = time.perf_counter()
  for _ in range(batches):
    next(it)
  return {"ms_per_batch": 1000 * (time.perf_counter() - t) / batches}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  p = argparse.ArgumentParser(prog="python -m experiments.benchmarks.cpu_profile")
  p.add_argument("--config", default="experiments/configs/gpt_bytes.py")
  p.add_argument("--override", action="append", default=[],
                 help="a config override, e.g. --override=--config.data.prefetch=0")
  p.add_argument("--from_step", type=int, default=100)
  p.add_argument("--to_step", type=int, default=200)
  p.add_argument("--steps", type=int, default=250)
  p.add_argument("--out", required=True)
  args = p.parse_args(argv)
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  overrides = [f"--config.train.num_steps={args.steps}",
               "--config.train.eval_every=100000",
               "--config.train.checkpoint_every=100000",
               "--config.train.tensorboard=False", "--config.task_options.sample_tokens=0",
               "--config.train.progress=False", *args.override]
  config = _config(args.config, overrides)
  import jax  # pylint: disable=g-import-not-at-top
  from jaxformer.training import loop  # pylint: disable=g-import-not-at-top
  trace_dir = str(out / "trace")
  marks: dict[str, float] = {}

  def hook(step: int) -> bool:
    if step == args.from_step:
      jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
      marks["t0"] = time.perf_counter()
    elif step == args.to_step:
      jax.profiler.stop_trace()
      marks["t1"] = time.perf_counter()
    return False

  workdir = tempfile.mkdtemp(prefix="cpu_profile_run_")
  summary = loop.train(config, workdir, should_stop=hook)
  traced = sorted(pathlib.Path(trace_dir).rglob("perfetto_trace.json.gz"))
  busy = thread_busy(traced[-1]) if traced else {"span_s": 0.0, "threads": []}
  wall = marks.get("t1", 0.0) - marks.get("t0", 0.0)
  n = args.to_step - args.from_step
  result = {
      "config": args.config, "overrides": args.override,
      "devices": jax.device_count(), "xla_flags": os.environ.get("XLA_FLAGS", ""),
      "load_avg": list(os.getloadavg()),
      "traced_steps": n, "traced_wall_s": wall,
      "ms_per_step_traced": 1000 * wall / max(n, 1),
      "loop_step_time_ms": summary.get("step_time_ms"),
      "cores_working": sum(r["working_s"] for r in busy["threads"]) / max(wall, 1e-9),
      "threads": busy["threads"][:12],
      "pipeline": time_pipeline(config),
  }
  for r in result["threads"]:
    print(f"{r['thread'][:32]:32s} working {1000 * r['working_s'] / n:6.1f} "
          f"waiting {1000 * r['waiting_s'] / n:6.1f} ms/step | "
          + ", ".join(f"{k[:28]} {1000 * v / n:.1f}" for k, v in r["top"][:3]))
  print(json.dumps({k: v for k, v in result.items() if k != "threads"}, indent=1))
  (out / "cpu_profile.json").write_text(json.dumps(result, indent=1) + "\n")
  return result


if __name__ == "__main__":
  main()
