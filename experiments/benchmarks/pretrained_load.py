"""Load time and peak memory of ``from_huggingface`` for the 124M GPT-2.

A GPT-2 small with random weights is written in the Hugging Face format
(``config.json`` + ``model.safetensors``, 475 MB of float32, by ``to_huggingface``);
then each repeat loads it in a fresh Python process that reports:

* ``load_s``: ``from_huggingface`` wall time (read, convert, place on the device);
* ``forward_s``: the first forward pass on 1 x 64 tokens (compilation included);
* ``baseline_mb``: the process's peak RSS after importing jax and jaxformer;
* ``peak_mb``: its peak RSS after loading and the forward (``VmHWM``); ``peak -
  baseline`` is what loading (and the forward's compilation) costs. The parameters
  themselves are 475 MB (on a CPU they live in host RAM).

  python -m experiments.benchmarks.pretrained_load --out experiments/benchmarks/results
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys

CHILD = r"""
import json, sys, time
import jax, jax.numpy as jnp, numpy as np
from jaxformer.pretrained import from_huggingface

def hwm_mb():  # this process's peak RSS (VmHWM starts afresh at exec, ru_maxrss not)
  for line in open("/proc/self/status"):
    if line.startswith("VmHWM:"):
      return int(line.split()[1]) / 1024

base = hwm_mb()
t = time.perf_counter()
model, params = from_huggingface(sys.argv[1])
jax.block_until_ready(params)
load = time.perf_counter() - t
load_peak = hwm_mb()
t = time.perf_counter()
logits = jax.jit(model.apply)({"params": params}, jnp.zeros((1, 64), jnp.int32))
jax.block_until_ready(logits)
fwd = time.perf_counter() - t
peak = hwm_mb()
count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
print("RESULT " + json.dumps(dict(load_s=load, forward_s=fwd, baseline_mb=base,
                                  load_peak_mb=load_peak, peak_mb=peak, stored_params=count)))
"""


def write_checkpoint(directory: str) -> None:
  """GPT-2 small with random weights, written as a Hugging Face checkpoint."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  from jaxformer.models import gpt  # pylint: disable=g-import-not-at-top
  from jaxformer.pretrained import to_huggingface  # pylint: disable=g-import-not-at-top
  cfg = gpt.gpt2_small()
  params = jax.jit(lambda r: nn.meta.unbox(gpt.GPT(cfg).init(
      r, jnp.zeros((1, 8), jnp.int32))["params"]))(jax.random.key(0))
  to_huggingface(cfg, params, directory)


def run(directory: str, repeats: int) -> list[dict]:
  env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
  if not os.path.exists(os.path.join(directory, "model.safetensors")):
    subprocess.run([sys.executable, "-m", "experiments.benchmarks.pretrained_load",
                    "--write_only", "--dir", directory], env=env, check=True)
  rows = []
  for _ in range(repeats):
    proc = subprocess.run([sys.executable, "-c", CHILD, directory], env=env,
                          capture_output=True, text=True, check=True)
    line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")][-1]
    rows.append(json.loads(line[len("RESULT "):]))
  return rows


def table(rows: list[dict], size_mb: float) -> str:
  med = lambda k: statistics.median(r[k] for r in rows)  # noqa: E731
  lines = [
      f"GPT-2 small (124,439,808 params; {rows[0]['stored_params']:,} stored with the "
      f"vocabulary padded), random weights, model.safetensors {size_mb:.0f} MB; "
      f"median of {len(rows)} fresh processes",
      "",
      "| load (s) | first forward 1x64 (s) | RSS after imports (MB) | peak RSS "
      "after loading (MB) | peak RSS after the forward (MB) |",
      "|---|---|---|---|---|",
      f"| {med('load_s'):.2f} | {med('forward_s'):.2f} | {med('baseline_mb'):.0f} | "
      f"{med('load_peak_mb'):.0f} | {med('peak_mb'):.0f} |"]
  return "\n".join(lines)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--dir", default="/tmp/jaxformer_gpt2_random",
                      help="where the random checkpoint is written (reused if there)")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--out", default=None, help="directory for the .md/.json result")
  parser.add_argument("--write_only", action="store_true",
                      help="only write the random checkpoint (in its own process)")
  args = parser.parse_args()
  if args.write_only:
    write_checkpoint(args.dir)
    return
  rows = run(args.dir, args.repeats)
  size = os.path.getsize(os.path.join(args.dir, "model.safetensors")) / 2**20
  text = table(rows, size)
  print(text)
  if args.out:
    import jax  # pylint: disable=g-import-not-at-top
    stamp = datetime.date.today().isoformat()
    name = os.path.join(args.out, f"pretrained_load-{jax.default_backend()}-{stamp}")
    header = (f"jax {jax.__version__}, {platform.processor() or platform.machine()}, "
              f"{os.cpu_count()} CPUs, {stamp}\n\n")
    with open(name + ".md", "w", encoding="utf-8") as f:
      f.write(header + text + "\n")
    with open(name + ".json", "w", encoding="utf-8") as f:
      json.dump({"rows": rows, "safetensors_mb": size}, f, indent=1)


if __name__ == "__main__":
  main()
