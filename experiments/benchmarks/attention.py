"""Attention benchmark: correctness, then speed and memory, every peer.

    python -m experiments.benchmarks.attention --out experiments/benchmarks/results

GPU (`--device-kind auto` on a GPU machine, or `gpu`): the FlashAttention-3
paper's shapes (head dim 64/128, seq 512..16k at 16k tokens per batch, hidden
2048, causal and not, bf16) through jaxformer's `dot_product_attention` for
xla/chunked/pallas/cudnn plus the peers of GPU.md (jax.nn xla/cudnn, JAX's
Pallas Triton `mha` and Hopper `attention_mgpu`, tokamax, torch SDPA flash and
cuDNN), each optional (skipped with the reason printed). Forward and
forward+backward, median of `--reps` timed runs after warm-up with
block_until_ready, inputs rotated over sets larger than L2, TFLOP/s as in
GPU.md (fwd 4*B*H*Tq*Tk*D, halved when causal; fwd+bwd 3.5x), temporary
memory from XLA's memory analysis.

CPU (`--device-kind auto` on a CPU machine, or `cpu`): the O(N) memory claim.
jax.nn.dot_product_attention (the baseline) and our xla vs chunked, float32,
causal, batch 1, 4 heads x 64, length 512..32k (the O(N^2) paths up to 8k), one
subprocess per point so that its peak RSS (ru_maxrss) is its own.

Writes <out>/attention-<device>-<date>.json and .md (date, device, versions).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import platform as platform_lib
import resource
import statistics
import subprocess
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

GPU_SEQS = (512, 1024, 2048, 4096, 8192, 16384)
TOKENS_PER_BATCH = 16384
HIDDEN = 2048
CPU_SEQS = (512, 1024, 2048, 4096, 8192, 16384, 32768)
CPU_XLA_MAX = 8192


@dataclasses.dataclass
class Row:
  impl: str
  mode: str  # "fwd" | "fwd+bwd"
  batch: int
  seq: int
  heads: int
  head_dim: int
  causal: bool
  ms: float | None = None
  tflops: float | None = None
  temp_mib: float | None = None
  peak_rss_mib: float | None = None
  max_err: float | None = None
  note: str = ""


def attention_flops(batch, heads, q_len, kv_len, head_dim, causal, mode):
  fwd = 4.0 * batch * heads * q_len * kv_len * head_dim
  fwd = fwd / 2 if causal else fwd
  return fwd * (3.5 if mode == "fwd+bwd" else 1.0)


# ------------------------------------------------------------ JAX peers --


def jax_impls(causal: bool) -> dict[str, Callable | str]:
  """name -> fn(q, k, v) in [B, L, H, D], or a str saying why it's skipped."""
  impls: dict[str, Callable | str] = {}
  try:
    from jaxformer.attention import dot_product_attention  # pylint: disable=g-import-not-at-top
    for name in ("xla", "chunked", "pallas", "cudnn"):
      impls[f"jaxformer/{name}"] = (
          lambda q, k, v, name=name: dot_product_attention(
              q, k, v, is_causal=causal, implementation=name))
  except ImportError as e:
    impls["jaxformer"] = f"import failed: {e}"
  for name in ("xla", "cudnn"):
    impls[f"jax.nn/{name}"] = (
        lambda q, k, v, name=name: jax.nn.dot_product_attention(
            q, k, v, is_causal=causal, implementation=name))
  try:
    from jax.experimental.pallas.ops.gpu import attention as pl_attention  # pylint: disable=g-import-not-at-top
    impls["jax-pallas/mha"] = lambda q, k, v: pl_attention.mha(
        q, k, v, segment_ids=None, causal=causal,
        sm_scale=1.0 / math.sqrt(q.shape[-1]))
  except ImportError as e:
    impls["jax-pallas/mha"] = f"import failed: {e}"
  try:
    from jax.experimental.pallas.ops.gpu import attention_mgpu  # pylint: disable=g-import-not-at-top
    def mgpu(q, k, v):
      config = attention_mgpu.TuningConfig(
          block_q=64, block_kv=64, max_concurrent_steps=2)
      return attention_mgpu.attention(q, k, v, config)
    impls["jax-pallas/mgpu"] = (mgpu if not causal else
                                "benchmarked non-causal only here")
  except (ImportError, AttributeError) as e:
    impls["jax-pallas/mgpu"] = f"unavailable: {e}"
  try:
    import tokamax  # pylint: disable=g-import-not-at-top
    impls["tokamax"] = lambda q, k, v: tokamax.dot_product_attention(
        q, k, v, is_causal=causal)
  except ImportError as e:
    impls["tokamax"] = f"import failed: {e}"
  return impls


def _time(fn, arg_sets, reps: int) -> float:
  """Median milliseconds over reps, rotating argument sets (after warm-up)."""
  jax.block_until_ready(fn(*arg_sets[0]))  # compile + warm up
  times = []
  for i in range(reps):
    args = arg_sets[i % len(arg_sets)]
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return 1e3 * statistics.median(times)


def _temp_mib(jitted, *args) -> float | None:
  try:
    analysis = jitted.lower(*args).compile().memory_analysis()
    return analysis.temp_size_in_bytes / 2**20
  except Exception:  # pylint: disable=broad-except
    return None


def _fwd_bwd(fn):
  def loss(q, k, v, dout):
    return jnp.sum(fn(q, k, v).astype(jnp.float32) * dout)
  return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def _inputs(seed, batch, seq, heads, head_dim, dtype):
  keys = jax.random.split(jax.random.key(seed), 4)
  shape = (batch, seq, heads, head_dim)
  return tuple(jax.random.normal(k, shape, jnp.float32).astype(dtype)
               for k in keys)


def _max_rel_err(got, want) -> float:
  got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
  return float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-6))


def run_gpu(reps: int, head_dims=(64, 128), seqs=GPU_SEQS) -> list[Row]:
  rows = []
  dtype = jnp.bfloat16
  for causal in (False, True):
    impls = jax_impls(causal)
    for name, fn in impls.items():
      if isinstance(fn, str):
        print(f"skip {name}: {fn}")
    # Correctness under real compilation first (vs jax.nn xla, float32 math).
    q, k, v, dout = _inputs(0, 2, 1024, 8, 128, dtype)
    ref = jax.nn.dot_product_attention(*(x.astype(jnp.float32)
                                         for x in (q, k, v)), is_causal=causal)
    ref_g = _fwd_bwd(lambda *a: jax.nn.dot_product_attention(
        *a, is_causal=causal))(*(x.astype(jnp.float32) for x in (q, k, v)),
                               dout.astype(jnp.float32))
    errors = {}
    for name, fn in list(impls.items()):
      if isinstance(fn, str):
        continue
      try:
        err = _max_rel_err(jax.jit(fn)(q, k, v), ref)
        grads = _fwd_bwd(fn)(q, k, v, dout)
        err = max(err, *(_max_rel_err(g, r) for g, r in zip(grads, ref_g)))
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
        sets = [_inputs(s, batch, seq, heads, head_dim, dtype)
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
                jitted = _fwd_bwd(fn)
                args = sets
              row.ms = _time(jitted, args, reps)
              row.tflops = attention_flops(batch, heads, seq, seq, head_dim,
                                           causal, mode) / row.ms / 1e9
              row.temp_mib = _temp_mib(jitted, *args[0])
            except Exception as e:  # pylint: disable=broad-except
              row.note = f"{type(e).__name__}: {str(e)[:120]}"
            print(_format_row(row), flush=True)
            rows.append(row)
  rows.extend(run_torch(reps, head_dims, seqs))
  return rows


def run_torch(reps, head_dims, seqs) -> list[Row]:
  """torch SDPA with the flash and cuDNN backends, same shapes."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
    from torch.nn.attention import SDPBackend, sdpa_kernel  # pylint: disable=g-import-not-at-top
    if not torch.cuda.is_available():
      print("skip torch: no CUDA device visible to torch")
      return []
  except ImportError as e:
    print(f"skip torch: {e}")
    return []
  rows = []
  backends = {"torch/flash": SDPBackend.FLASH_ATTENTION,
              "torch/cudnn": SDPBackend.CUDNN_ATTENTION}
  for causal in (False, True):
    for head_dim in head_dims:
      heads = HIDDEN // head_dim
      for seq in seqs:
        batch = TOKENS_PER_BATCH // seq
        sets = [[torch.randn(batch, heads, seq, head_dim, device="cuda",
                             dtype=torch.bfloat16, requires_grad=True)
                 for _ in range(3)] for _ in range(3)]
        for name, backend in backends.items():
          for mode in ("fwd", "fwd+bwd"):
            row = Row(name, mode, batch, seq, heads, head_dim, causal)
            try:
              with sdpa_kernel(backend):
                def step(q, k, v):
                  out = torch.nn.functional.scaled_dot_product_attention(
                      q, k, v, is_causal=causal)
                  if mode == "fwd+bwd":
                    out.backward(torch.ones_like(out))
                for s in sets[:2]:
                  step(*s)
                torch.cuda.synchronize()
                times = []
                for i in range(reps):
                  start = torch.cuda.Event(enable_timing=True)
                  end = torch.cuda.Event(enable_timing=True)
                  start.record()
                  step(*sets[i % 3])
                  end.record()
                  torch.cuda.synchronize()
                  times.append(start.elapsed_time(end))
              row.ms = statistics.median(times)
              row.tflops = attention_flops(batch, heads, seq, seq, head_dim,
                                           causal, mode) / row.ms / 1e9
            except Exception as e:  # pylint: disable=broad-except
              row.note = f"{type(e).__name__}: {str(e)[:120]}"
            print(_format_row(row), flush=True)
            rows.append(row)
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
  sets = [_inputs(s, 1, seq, 4, 64, jnp.float32) for s in range(2)]
  if mode == "fwd":
    jitted, args = jax.jit(fn), [s[:3] for s in sets]
  else:
    jitted, args = _fwd_bwd(fn), sets
  ms = _time(jitted, args, reps)
  return dict(ms=ms, temp_mib=_temp_mib(jitted, *args[0]),
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
        print(_format_row(row), flush=True)
        rows.append(row)
  return rows


# -------------------------------------------------------------- output --


def _fmt(x, spec):
  return "-" if x is None else format(x, spec)


def _format_row(r: Row) -> str:
  return (f"{r.impl:22s} {r.mode:8s} causal={int(r.causal)} b={r.batch:<3d}"
          f" L={r.seq:<6d} h={r.heads:<3d} d={r.head_dim:<4d}"
          f" {_fmt(r.ms, '9.3f')} ms {_fmt(r.tflops, '8.2f')} TFLOP/s"
          f" temp {_fmt(r.temp_mib, '9.1f')} MiB"
          f" rss {_fmt(r.peak_rss_mib, '8.1f')} MiB {r.note}")


def environment() -> dict[str, Any]:
  device = jax.devices()[0]
  env = dict(date=datetime.datetime.now().isoformat(timespec="seconds"),
             device=device.device_kind, platform=device.platform,
             jax=jax.__version__, python=platform_lib.python_version(),
             host=platform_lib.machine(), cpu_count=os.cpu_count())
  try:
    import jaxlib  # pylint: disable=g-import-not-at-top
    env["jaxlib"] = jaxlib.__version__
  except ImportError:
    pass
  if device.platform == "gpu":
    try:
      env["cuda"] = str(jax.lib.xla_bridge.get_backend().platform_version)
    except Exception:  # pylint: disable=broad-except
      pass
  return env


def write(out_dir: str, rows: list[Row], env: dict[str, Any]) -> str:
  os.makedirs(out_dir, exist_ok=True)
  tag = "gpu" if env["platform"] == "gpu" else env["platform"]
  stem = os.path.join(out_dir, f"{tag}-{env['date'][:10]}")
  with open(stem + ".json", "w") as f:
    json.dump(dict(environment=env, rows=[dataclasses.asdict(r)
                                          for r in rows]), f, indent=1)
  lines = [f"# Attention benchmark, {env['date'][:10]}", "",
           "Environment: " + ", ".join(f"{k} {v}" for k, v in env.items()),
           "", "FLOPs: forward 4·B·H·Tq·Tk·D (halved when causal); fwd+bwd"
           " 3.5× forward. temp = XLA temporary buffers of the compiled"
           " function; rss = peak resident memory of the point's process.",
           "", "| impl | mode | causal | batch | seq | heads | head_dim | ms |"
           " TFLOP/s | temp MiB | rss MiB | note |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(
        f"| {r.impl} | {r.mode} | {int(r.causal)} | {r.batch} | {r.seq} |"
        f" {r.heads} | {r.head_dim} | {_fmt(r.ms, '.3f')} |"
        f" {_fmt(r.tflops, '.3f')} | {_fmt(r.temp_mib, '.1f')} |"
        f" {_fmt(r.peak_rss_mib, '.1f')} | {r.note} |")
  with open(stem + ".md", "w") as f:
    f.write("\n".join(lines) + "\n")
  return stem


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", default="experiments/benchmarks/results")
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
    rows = run_gpu(args.reps or 30)
  else:
    rows = run_cpu(args.reps or 3)
  print("wrote", write(args.out, rows, env) + ".{json,md}")


if __name__ == "__main__":
  main()
