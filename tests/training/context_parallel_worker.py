"""Subprocess worker for the end-to-end context-parallel test (not a test module).

  python tests/training/context_parallel_worker.py WORKDIR
      -> JSON: the per-step training losses of the tiny byte-level GPT
         (``gpt_bytes.py:tiny``: 20 steps, batch 4 x 32 tokens) trained through the
         CLI on 4 CPU devices with the meshes (4,1,1,1), (1,1,1,4) (ring and
         all-gather), (2,1,1,2) and (1,2,1,2); the losses of a (1,1,1,4) run resumed
         from its step-10 checkpoint; and the text sample each run generated.

Every run goes through ``experiments.train`` (flags parsed as on the command line) in
this one process: the first sets ``--config.sharding.cpu_devices=4`` before JAX starts.
"""

from __future__ import annotations

import json
import os
import shutil
import sys

RUNS = {
    "data4": "(4,1,1,1)",
    "context4": "(1,1,1,4)",
    "context4_all_gather": "(1,1,1,4)",
    "data2_context2": "(2,1,1,2)",
    "fsdp2_context2": "(1,2,1,2)",
}


def _cli(workdir: str, mesh: str, *extra: str) -> None:
  from experiments import train as cli  # pylint: disable=g-import-not-at-top
  cli.parse_flags(["train", "--config=experiments/configs/gpt_bytes.py:tiny",
                   f"--workdir={workdir}", f"--config.sharding.mesh_shape={mesh}",
                   "--config.sharding.cpu_devices=4", "--config.train.log_every=1",
                   "--config.train.progress=False", "--config.train.tensorboard=False",
                   *extra])
  cli.main(["train"])


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


def main(root: str) -> None:
  out = {}
  for name, mesh in RUNS.items():
    extra = (("--config.sharding.context_parallel=all_gather",)
             if name.endswith("all_gather") else ())
    workdir = os.path.join(root, name)
    _cli(workdir, mesh, *extra)
    out[name] = {"losses": _losses(workdir), "sample": _sample(workdir)}
  # Resume: the (1,1,1,4) run's workdir without its last checkpoint restarts at 10.
  resumed = os.path.join(root, "context4_resumed")
  shutil.copytree(os.path.join(root, "context4"), resumed)
  ckpts = os.path.join(resumed, "checkpoints")
  steps = sorted(int(d) for d in os.listdir(ckpts) if d.isdigit())
  assert steps[-2:] == [10, 20], steps
  shutil.rmtree(os.path.join(ckpts, "20"))
  os.remove(os.path.join(resumed, "metrics.jsonl"))
  _cli(resumed, RUNS["context4"])
  out["context4_resumed"] = {"losses": _losses(resumed), "sample": _sample(resumed)}
  import jax  # pylint: disable=g-import-not-at-top
  out["devices"] = jax.device_count()
  print("RESULT " + json.dumps(out), flush=True)


if __name__ == "__main__":
  main(sys.argv[1])
