"""Train-step throughput of GPT presets: step time, tokens/s, MFU, on the present device.

Times the jitted ``train_step`` of :mod:`jaxformer.training.steps` (AdamW, clipping,
skip checks, donated state) on fixed synthetic batches, so the numbers are the model +
optimizer alone (the data pipeline runs ahead in a thread during real training). Each
preset is compiled once, warmed up, then timed over ``--steps`` steps with one host
sync at the end; the median of ``--repeats`` such timings is reported.

  python -m experiments.benchmarks.train_step --out /tmp/bench
  python -m experiments.benchmarks.train_step --cpu_devices=0 --out /tmp/bench  # one
      # CPU device instead of one per core (the default, as in gpt_bytes.py)
  python -m experiments.benchmarks.train_step --presets nano,gpt2_small \\
      --dtype bfloat16 --out /tmp/bench            # on an accelerator

Presets (``name: model, batch x length``): see :data:`PRESETS`. The table is printed
and written with the raw numbers to ``<out>/train_step-<platform>.json``. MFU uses the
dense bf16 peak of :mod:`jaxformer.training.metrics_logger` (omitted on CPUs) and
``6 N + 12 n_layers d L`` FLOPs per token.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxformer.models import gpt
from jaxformer.training import metrics_logger
from jaxformer.training import optimizer as opt
from jaxformer.training import sharding
from jaxformer.training import state as state_lib
from jaxformer.training import steps
from jaxformer import tasks

# name -> (GPTConfig factory, batch, length)
PRESETS: dict[str, tuple[Any, int, int]] = {
    "tiny": (gpt.gpt_tiny, 8, 16),
    "nano": (gpt.gpt_nano, 12, 64),                  # the gpt_bytes main job
    "micro": (lambda **kw: gpt.gpt_nano(**{**dict(
        num_layers=6, embed_dim=256, num_heads=8, mlp_dim=1024, max_len=256),
                                        **kw}), 16, 256),
    "gpt2_small": (gpt.gpt2_small, 8, 1024),
}


def bench_preset(name: str, *, steps_per_timing: int, repeats: int,
                 dtype: str | None, mesh_shape: tuple[int, ...],
                 batch: int | None = None) -> dict[str, Any]:
  """Compiles and times one preset; returns a row of numbers."""
  factory, default_batch, length = PRESETS[name]
  overrides = {"dropout_rate": 0.0, "attention_dropout_rate": 0.0}
  if dtype:
    overrides["dtype"] = jnp.dtype(dtype)
  cfg = factory(**overrides)
  batch = batch or default_batch
  model = gpt.GPT(cfg)
  mesh = sharding.Sharding.build(sharding.ShardingConfig(mesh_shape=mesh_shape))
  ocfg = opt.OptimizerConfig(learning_rate=1e-4, warmup_steps=10)
  tx = opt.make_optimizer(ocfg, 1000)
  init_fn = lambda r: model.init(r, jnp.zeros((mesh.batch_divisor,
                                               length), jnp.int32))
  state, shard = state_lib.create_train_state(init_fn, tx, jax.random.key(0), mesh)
  step = steps.make_train_step(model=model, task=tasks.CausalLM({}), tx=tx,
                               opt_config=ocfg, sharding=mesh,
                               shardings=shard)
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, cfg.vocab_size, (batch, length + 1)).astype(np.int32)
  data = mesh.shard_batch({
      "inputs": tokens[:, :-1], "targets": tokens[:, 1:],
      "weights": np.ones((batch, length), np.float32)})
  t0 = time.perf_counter()
  state, metrics = step(state, data)
  jax.block_until_ready(metrics)
  compile_s = time.perf_counter() - t0
  for _ in range(2):
    state, metrics = step(state, data)
  jax.block_until_ready(metrics)
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    for _ in range(steps_per_timing):
      state, metrics = step(state, data)
    jax.block_until_ready(metrics)
    times.append((time.perf_counter() - t0) / steps_per_timing)
  step_s = statistics.median(times)
  num_params = state_lib.count_params(state.params)
  tokens_per_step = batch * length
  flops = tokens_per_step * metrics_logger.flops_per_token(
      num_params=num_params, num_layers=cfg.num_layers, width=cfg.embed_dim,
      seq_len=length)
  peak = metrics_logger.peak_flops_per_device()
  row = {
      "preset": name, "params": num_params, "batch": batch, "length": length,
      "dtype": jnp.dtype(cfg.block.dtype).name, "compile_s": compile_s,
      "step_ms": 1000 * step_s, "step_ms_all": [1000 * t for t in times],
      "tokens_per_s": tokens_per_step / step_s, "model_tflops_per_s": flops / step_s / 1e12,
      "loss": float(metrics["loss"]),
  }
  if peak is not None:
    row["mfu"] = flops / step_s / (peak * jax.device_count())
  return row


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--presets", default="tiny,nano",
                      help=f"comma-separated, from {sorted(PRESETS)}")
  parser.add_argument("--steps", type=int, default=20, help="steps per timing")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--dtype", default=None,
                      help="compute dtype override (e.g. bfloat16); default: preset's")
  parser.add_argument("--batch", type=int, default=None, help="override batch size")
  parser.add_argument("--mesh_shape", default="-1,1,1",
                      help="data,fsdp,tensor sizes (-1 = remaining devices)")
  parser.add_argument("--cpu_devices", type=int, default=-1,
                      help="CPU only: split the host into N JAX devices (-1 = one per "
                      "core dividing the batch; 0 = JAX default), as "
                      "config.sharding.cpu_devices")
  parser.add_argument("--out", default=None, help="directory for the JSON file")
  args = parser.parse_args(argv)
  names = [n for n in args.presets.split(",") if n]
  unknown = sorted(set(names) - set(PRESETS))
  if unknown:
    parser.error(f"--presets: unknown {unknown}; known: {sorted(PRESETS)}")
  mesh_shape = tuple(int(x) for x in args.mesh_shape.split(","))
  batches = [args.batch or PRESETS[n][1] for n in names]
  sharding.configure_cpu_devices(args.cpu_devices, math.gcd(*batches))
  device = jax.devices()[0]
  rows = []
  for name in names:
    rows.append(bench_preset(name, steps_per_timing=args.steps, repeats=args.repeats,
                             dtype=args.dtype, mesh_shape=mesh_shape,
                             batch=args.batch))
  header = (f"{'preset':<11} {'params':>12} {'B x L':>10} {'dtype':>9} {'compile s':>9} "
            f"{'ms/step':>9} {'tokens/s':>11} {'TFLOP/s':>8} {'MFU':>6}")
  print(f"device: {jax.device_count()} x {device.device_kind} ({device.platform}), "
        f"jax {jax.__version__}")
  print(header)
  for r in rows:
    mfu = f"{100 * r['mfu']:5.1f}%" if "mfu" in r else "   n/a"
    print(f"{r['preset']:<11} {r['params']:>12,} {r['batch']:>4} x {r['length']:<5}"
          f"{r['dtype']:>9} {r['compile_s']:>9.1f} {r['step_ms']:>9.2f} "
          f"{r['tokens_per_s']:>11,.0f} {r['model_tflops_per_s']:>8.3f} {mfu}")
  if args.out:
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"train_step-{device.platform}.json")
    with open(path, "w", encoding="utf-8") as f:
      json.dump({"device": device.device_kind, "platform": device.platform,
                 "num_devices": jax.device_count(), "jax": jax.__version__,
                 "rows": rows}, f, indent=2)
    print(f"wrote {path}")
  return rows


if __name__ == "__main__":
  main()
