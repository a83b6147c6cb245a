"""Subprocess worker for the end-to-end context-parallel test (not a test module).

  python tests/training/context_parallel_worker.py WORKDIR [RUN ...]
      -> JSON: the per-step training losses of the tiny byte-level GPT
         (``gpt_bytes.py:tiny``: 20 steps, batch 4 x 32 tokens) trained through the
         CLI on 4 CPU devices with the meshes (4,1,1,1), (1,1,1,4), (2,1,1,2) and
         (1,2,1,2); the losses of a (1,1,1,4) run resumed from its step-10
         checkpoint; the text samples. (The all-gather mode is checked against the
         ring at the attention level: tests/attention/context_parallel_worker.py.)

All in this one process: the first run (1,1,1,4) goes through ``experiments.train``
with its command line (``--config.sharding.mesh_shape=(1,1,1,4)
--config.sharding.cpu_devices=4 ...``, which splits the CPU before JAX starts); the
others apply the same overrides to the same config file and call ``loop.train``.
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import sys
import time

CONFIG = "experiments/configs/gpt_bytes.py:tiny"
RUNS = {
    "data4": "(4,1,1,1)",
    "context4": "(1,1,1,4)",
    "data2_context2": "(2,1,1,2)",
    "fsdp2_context2": "(1,2,1,2)",
}


def _overrides(mesh: str, extra: dict[str, str]) -> list[str]:
  flags = {"sharding.mesh_shape": mesh, "sharding.cpu_devices": "4",
           "train.log_every": "1", "train.progress": "False",
           "train.tensorboard": "False", **extra}
  return [f"--config.{k}={v}" for k, v in flags.items()]


def _cli(workdir: str, mesh: str, extra: dict[str, str]) -> None:
  """Exactly what ``python -m experiments.train ...`` does (absl's config flags read
  ``sys.argv``, and only once per process: later runs use :func:`_train`)."""
  from experiments import command_line  # pylint: disable=g-import-not-at-top
  from experiments import train as cli  # pylint: disable=g-import-not-at-top
  sys.argv = ["train", f"--config={CONFIG}", f"--workdir={workdir}",
              *_overrides(mesh, extra)]
  command_line.parse_flags(sys.argv)
  cli.main(["train"])


def _train(workdir: str, mesh: str, extra: dict[str, str]) -> None:
  """The CLI's overrides applied to the config file's config, then ``loop.train``."""
  from experiments.configs import gpt_bytes  # pylint: disable=g-import-not-at-top
  from jaxformer.training import loop  # pylint: disable=g-import-not-at-top
  config = gpt_bytes.get_config("tiny")
  for flag in _overrides(mesh, extra):
    path, value = flag[len("--config."):].split("=", 1)
    parent = config
    *heads, last = path.split(".")
    for head in heads:
      parent = parent[head]
    parent[last] = value if isinstance(parent[last], str) else ast.literal_eval(value)
  loop.train(config, workdir)


def _losses(workdir: str) -> dict[int, float]:
  out = {}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      row = json.loads(line)
      if "loss" in row and "step" in row:
        out[int(row["step"])] = float(row["loss"])
  return out


def _sample(workdir: str) -> str | None:
  path = os.path.join(workdir, "summary.json")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    summary = json.load(f)
  return summary.get("sample")


def main(root: str, names: list[str]) -> None:
  out = {}
  order = ["context4"] + [n for n in RUNS if n != "context4"]
  for i, name in enumerate(order):
    if names and name not in names:
      continue
    extra = {}
    if name not in ("context4", "data4"):   # one evaluation, no sample: less to compile
      extra.update({"task_options.sample_tokens": "0", "train.eval_every": "20"})
    workdir = os.path.join(root, name)
    start = time.perf_counter()
    (_cli if i == 0 else _train)(workdir, RUNS[name], extra)
    out[name] = {"losses": _losses(workdir), "sample": _sample(workdir),
                 "seconds": time.perf_counter() - start}
  # Resume: the (1,1,1,4) run's workdir without its last checkpoint restarts at 10.
  resumed = os.path.join(root, "context4_resumed")
  shutil.copytree(os.path.join(root, "context4"), resumed)
  ckpts = os.path.join(resumed, "checkpoints")
  steps = sorted(int(d) for d in os.listdir(ckpts) if d.isdigit())
  assert steps[-2:] == [10, 20], steps
  shutil.rmtree(os.path.join(ckpts, "20"))
  os.remove(os.path.join(resumed, "metrics.jsonl"))
  _train(resumed, RUNS["context4"], {})
  out["context4_resumed"] = {"losses": _losses(resumed), "sample": _sample(resumed)}
  import jax  # pylint: disable=g-import-not-at-top
  out["devices"] = jax.device_count()
  print("RESULT " + json.dumps(out), flush=True)


if __name__ == "__main__":
  main(sys.argv[1], sys.argv[2:])
