"""Attention benchmark, the long optional sweep: correctness, then speed and memory, every peer.

    python -m experiments.benchmarks.attention --out experiments/benchmarks/results --device-kind gpu

The short command that fits one GPU call (8 minutes: on-device correctness of every
backend, the kernel table the dispatcher reads, training MFU) is
``experiments.benchmarks.gpu_check``; this sweep is longer (20-40 minutes on an H100:
every peer, seq 512..16k, torch and tokamax) and optional.

GPU (`--device-kind gpu`, or `auto` on a GPU machine): the FlashAttention-3
paper's shapes (head dim 64/128, seq 512..16k at 16k tokens per batch, hidden
2048, causal and not, bf16), forward and forward+backward, for
  * ours: jaxformer's `dot_product_attention` with xla/chunked/pallas/cudnn,
    and the kernel's backends directly: `kernels/triton` and
    `kernels/mosaic_gpu` (when this checkout has the Mosaic GPU backend);
  * peers (GPU.md): jax.nn xla/cudnn, JAX's Pallas Triton `mha` and Hopper
    `attention_mgpu`, tokamax, torch SDPA flash and cuDNN;
each optional (skipped with the reason printed). Correctness under real
compilation first (vs jax.nn in float32), then the median of `--reps` timed
runs after warm-up with block_until_ready, inputs rotated over sets larger
than L2, TFLOP/s as in GPU.md (fwd 4*B*H*Tq*Tk*D, halved when causal;
fwd+bwd 3.5x), temporary memory from XLA's memory analysis.

CPU (`--device-kind cpu`, or `auto` on a CPU machine): the O(N) memory claim.
jax.nn.dot_product_attention (the baseline) and our xla vs chunked, float32,
causal, batch 1, 4 heads x 64, length 512..32k (the O(N^2) paths up to 8k), one
subprocess per point so that its peak RSS (ru_maxrss) is its own.

Writes <out>/attention-<gpu|cpu>-<date>.json and .md (date, device, versions);
on a GPU also <out>/attention-dispatch-<device kind>.json, the table that
`dot_product_attention(implementation=None)` reads to choose between cuDNN and
the Pallas kernel on that device kind (jaxformer/attention/gpu_table.py).
Commit both.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp

from experiments.benchmarks.attention_lib import Row
from experiments.benchmarks.attention_lib import attention_flops
from experiments.benchmarks.attention_lib import environment
from experiments.benchmarks.attention_lib import format_row
from experiments.benchmarks.attention_lib import fwd_bwd
from experiments.benchmarks.attention_lib import inputs
from experiments.benchmarks.attention_lib import jax_impls
from experiments.benchmarks.attention_lib import max_rel_err
from experiments.benchmarks.attention_lib import run_torch
from experiments.benchmarks.attention_lib import temp_mib
from experiments.benchmarks.attention_lib import time_ms
from experiments.benchmarks.attention_lib import write
from experiments.benchmarks.attention_lib import write_dispatch_table

GPU_SEQS = (512, 1024, 2048, 4096, 8192, 16384)
TOKENS_PER_BATCH = 16384
HIDDEN = 2048
CPU_SEQS = (512, 1024, 2048, 4096, 8192, 16384, 32768)
CPU_XLA_MAX = 8192


def run_gpu(reps: int, head_dims=(64, 128), seqs=GPU_SEQS) -> list[Row]:
  rows = []
  dtype = jnp.bfloat16
  for causal in (False, True):
    impls = jax_impls(causal)
    for name, fn in impls.items():
      if isinstance(fn, str):
        print(f"skip {name}: {fn}")
    # Correctness under real compilation first (vs jax.nn xla, float32 math).
    q, k, v, dout = inputs(0, 2, 1024, 8, 128, dtype)
    ref = jax.nn.dot_product_attention(*(x.astype(jnp.float32)
                                         for x in (q, k, v)), is_causal=causal)
    ref_g = fwd_bwd(lambda *a: jax.nn.dot_product_attention(
        *a, is_causal=causal))(*(x.astype(jnp.float32) for x in (q, k, v)),
                               dout.astype(jnp.float32))
    errors = {}
    for name, fn in list(impls.items()):
      if isinstance(fn, str):
        continue
      try:
        err = max_rel_err(jax.jit(fn)(q, k, v), ref)
        grads = fwd_bwd(fn)(q, k, v, dout)
        err = max(err, *(max_rel_err(g, r) for g, r in zip(grads, ref_g)))
        errors[name] = err
        print(f"check {name:22s} causal={causal}: max rel err {err:.2e}")
        if not err < 5e-2:
          impls[name] = f"WRONG (max rel err {err:.2e})"
      except Exception as e:  # pylint: disable=broad-except
        impls[name] = f"failed: {type(e).__name__}: {str(e)[:200]}"
        print(f"skip {name}: {impls[name]}")
    for head_dim in head_dims:
      heads = HIDDEN // head_dim
      for seq in seqs:
        batch = TOKENS_PER_BATCH // seq
        sets = [inputs(s, batch, seq, heads, head_dim, dtype)
                for s in range(3)]  # 3 x 4 x 32 MiB: rotates past L2
        for name, fn in impls.items():
          if isinstance(fn, str):
            continue
          for mode in ("fwd", "fwd+bwd"):
            row = Row(name, mode, batch, seq, heads, head_dim, causal,
                      max_err=errors.get(name))
            try:
              if mode == "fwd":
                jitted = jax.jit(fn)
                args = [s[:3] for s in sets]
              else:
                jitted = fwd_bwd(fn)
                args = sets
              row.ms = time_ms(jitted, args, reps)
              row.tflops = attention_flops(batch, heads, seq, seq, head_dim,
                                           causal, mode) / row.ms / 1e9
              row.temp_mib = temp_mib(jitted, *args[0])
            except Exception as e:  # pylint: disable=broad-except
              row.note = f"{type(e).__name__}: {str(e)[:120]}"
            print(format_row(row), flush=True)
            rows.append(row)
  rows.extend(run_torch(reps, head_dims, seqs))
  return rows


# ----------------------------------------------------------------- CPU --


def cpu_point(impl: str, seq: int, mode: str, reps: int) -> dict[str, Any]:
  """One (implementation, length, mode) in this process; prints JSON."""
  from jaxformer.attention import dot_product_attention  # pylint: disable=g-import-not-at-top
  if impl == "jax.nn":  # the baseline the project's CPU targets are stated against
    fn = lambda q, k, v: jax.nn.dot_product_attention(  # noqa: E731
        q, k, v, is_causal=True)
  else:
    fn = lambda q, k, v: dot_product_attention(  # noqa: E731
        q, k, v, is_causal=True, implementation=impl)
  sets = [inputs(s, 1, seq, 4, 64, jnp.float32) for s in range(2)]
  if mode == "fwd":
    jitted, args = jax.jit(fn), [s[:3] for s in sets]
  else:
    jitted, args = fwd_bwd(fn), sets
  ms = time_ms(jitted, args, reps)
  return dict(ms=ms, temp_mib=temp_mib(jitted, *args[0]),
              peak_rss_mib=resource.getrusage(
                  resource.RUSAGE_SELF).ru_maxrss / 1024)


def run_cpu(reps: int, seqs=CPU_SEQS, budget_s: float = 900.0) -> list[Row]:
  rows = []
  start = time.time()
  for seq in seqs:
    for impl in ("jax.nn", "xla", "chunked"):
      if impl != "chunked" and seq > CPU_XLA_MAX:
        continue
      for mode in ("fwd", "fwd+bwd"):
        name = impl if impl == "jax.nn" else f"jaxformer/{impl}"
        row = Row(name, mode, 1, seq, 4, 64, True)
        if time.time() - start > budget_s:
          row.note = "skipped: time budget"
          rows.append(row)
          continue
        point_reps = reps if seq <= 4096 else 1
        cmd = [sys.executable, "-m", "experiments.benchmarks.attention",
               "--cpu-point", f"{impl},{seq},{mode},{point_reps}"]
        proc = subprocess.run(cmd, capture_output=True, text=True,
                              check=False, env={**os.environ,
                                                "JAX_PLATFORMS": "cpu"})
        if proc.returncode == 0:
          result = json.loads(proc.stdout.strip().splitlines()[-1])
          row.ms, row.temp_mib = result["ms"], result["temp_mib"]
          row.peak_rss_mib = result["peak_rss_mib"]
          row.tflops = attention_flops(1, 4, seq, seq, 64, True,
                                       mode) / row.ms / 1e9
        else:
          row.note = ("failed: "
                      + (proc.stderr.strip().splitlines() or ["?"])[-1][:120])
        print(format_row(row), flush=True)
        rows.append(row)
  return rows


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", default="experiments/benchmarks/results")
  parser.add_argument("--seqs", default=None,
                      help="comma-separated sequence lengths (default: all)")
  parser.add_argument("--device-kind", default="auto",
                      choices=("auto", "gpu", "cpu"))
  parser.add_argument("--reps", type=int, default=None,
                      help="timed repetitions (default 30 on GPU, 3 on CPU)")
  parser.add_argument("--cpu-point", default=None, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.cpu_point:
    impl, seq, mode, reps = args.cpu_point.split(",")
    print(json.dumps(cpu_point(impl, int(seq), mode, int(reps))))
    return
  kind = args.device_kind
  if kind == "auto":
    kind = "gpu" if jax.default_backend() == "gpu" else "cpu"
  env = environment()
  print(json.dumps(env))
  if kind == "gpu":
    seqs = tuple(int(s) for s in args.seqs.split(",")) if args.seqs else GPU_SEQS
    rows = run_gpu(args.reps or 30, seqs=seqs)
  else:
    rows = run_cpu(args.reps or 3)
  print("wrote", write(args.out, rows, env) + ".{json,md}")
  if kind == "gpu":
    print("wrote", write_dispatch_table(args.out, rows, env))


if __name__ == "__main__":
  main()
