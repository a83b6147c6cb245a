"""Helpers of the attention benchmark (attention.py): peers, timing, output tables.

Kept apart so that attention.py stays the readable driver. The dispatch table written
here (`dispatch_table`) is the one `jaxformer.attention.gpu_table` reads to choose the
GPU default.
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib.util
import json
import math
import os
import platform as platform_lib
import statistics
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxformer.attention import gpu_table


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
  """name -> fn(q, k, v) in [B, L, H, D], or a str saying why it's skipped.

  Ours: jaxformer's dot_product_attention per implementation (pallas = what the
  GPU default would run; the dispatch table compares it with cudnn) and the
  kernel's backends directly (mosaic_gpu only when this checkout has it).
  Peers: jax.nn, JAX's Pallas Triton `mha` and Hopper `attention_mgpu`,
  tokamax (when importable).
  """
  impls: dict[str, Callable | str] = {}
  try:
    from jaxformer.attention import dot_product_attention  # pylint: disable=g-import-not-at-top
    for name in ("xla", "chunked", "pallas", "cudnn"):
      impls[f"jaxformer/{name}"] = (
          lambda q, k, v, name=name: dot_product_attention(
              q, k, v, is_causal=causal, implementation=name))
  except ImportError as e:
    impls["jaxformer"] = f"import failed: {e}"
  try:
    from kernels.flash_attention import flash_attention  # pylint: disable=g-import-not-at-top
    for backend in ("triton", "mosaic_gpu"):
      if (backend == "mosaic_gpu" and importlib.util.find_spec(
          "kernels.flash_attention.mosaic_gpu") is None):
        impls[f"kernels/{backend}"] = "not in this checkout"
        continue
      impls[f"kernels/{backend}"] = (
          lambda q, k, v, backend=backend: flash_attention(
              q, k, v, is_causal=causal, backend=backend))
  except ImportError as e:
    impls["kernels"] = f"import failed: {e}"
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
    config = attention_mgpu.TuningConfig(
        block_q=128, block_kv=128, max_concurrent_steps=2, causal=causal,
        block_q_dkv=64, block_kv_dkv=64, block_q_dq=64, block_kv_dq=64)
    # Its scratch is hard-coded float16 (bf16 inputs fail): run it in float16, the
    # output cast back; the FLOPs are the same.
    impls["jax-pallas/mgpu(fp16)"] = lambda q, k, v: attention_mgpu.attention(
        q.astype(jnp.float16), k.astype(jnp.float16), v.astype(jnp.float16),
        config).astype(q.dtype)
  except (ImportError, AttributeError, TypeError) as e:
    impls["jax-pallas/mgpu(fp16)"] = f"unavailable: {e}"
  try:
    import tokamax  # pylint: disable=g-import-not-at-top
    impls["tokamax"] = lambda q, k, v: tokamax.dot_product_attention(
        q, k, v, is_causal=causal)
  except ImportError as e:
    impls["tokamax"] = f"import failed: {e}"
  return impls


def time_ms(fn, arg_sets, reps: int) -> float:
  """Median milliseconds over reps, rotating argument sets (after warm-up)."""
  jax.block_until_ready(fn(*arg_sets[0]))  # compile + warm up
  times = []
  for i in range(reps):
    args = arg_sets[i % len(arg_sets)]
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return 1e3 * statistics.median(times)


def temp_mib(jitted, *args) -> float | None:
  try:
    analysis = jitted.lower(*args).compile().memory_analysis()
    return analysis.temp_size_in_bytes / 2**20
  except Exception:  # pylint: disable=broad-except
    return None


def fwd_bwd(fn):
  def loss(q, k, v, dout):
    return jnp.sum(fn(q, k, v).astype(jnp.float32) * dout)
  return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def inputs(seed, batch, seq, heads, head_dim, dtype):
  keys = jax.random.split(jax.random.key(seed), 4)
  shape = (batch, seq, heads, head_dim)
  return tuple(jax.random.normal(k, shape, jnp.float32).astype(dtype)
               for k in keys)


def max_rel_err(got, want) -> float:
  got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
  return float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-6))


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
            print(format_row(row), flush=True)
            rows.append(row)
  return rows


# -------------------------------------------------------------- output --


def _fmt(x, spec):
  return "-" if x is None else format(x, spec)


def format_row(r: Row) -> str:
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
  stem = os.path.join(out_dir, f"attention-{tag}-{env['date'][:10]}")
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


def dispatch_table(rows: list[Row], env: dict[str, Any]) -> dict[str, Any]:
  """The table `jaxformer.attention.gpu_table` reads: pallas vs cudnn per case.

  One row per (seq bucket, dtype, causal, head dim, mode) where both
  jaxformer/pallas and jaxformer/cudnn were timed (bf16, as benchmarked).
  """
  times: dict[tuple, dict[str, float]] = {}
  for r in rows:
    impl = {"jaxformer/pallas": "pallas", "jaxformer/cudnn": "cudnn"}.get(r.impl)
    if impl is None or r.ms is None:
      continue
    case = gpu_table.Case.of(r.seq, r.seq, jnp.bfloat16, r.causal, r.head_dim)
    times.setdefault((case, r.mode), {})[impl] = r.ms
  cases = [dict(dataclasses.asdict(case), mode=mode, ms=ms)
           for (case, mode), ms in times.items() if len(ms) == 2]
  return dict(format=gpu_table.FORMAT, device_kind=env["device"],
              environment=env, cases=cases)


def write_dispatch_table(out_dir: str, rows: list[Row], env: dict[str, Any]) -> str:
  """Writes <out>/attention-dispatch-<device>.json (the GPU default reads it)."""
  os.makedirs(out_dir, exist_ok=True)
  path = os.path.join(out_dir, gpu_table.table_filename(env["device"]))
  with open(path, "w") as f:
    json.dump(dispatch_table(rows, env), f, indent=1)
    f.write("\n")
  return path
