"""Context parallelism: memory per device and step time against context length.

One GPT training step (loss and gradients of a small GPT, batch 1) at growing context
lengths, three ways:

  none        one device, the whole sequence (the default attention: chunked on CPU);
  ring        N devices, the sequence sharded over the ``context`` mesh axis, ring
              attention (K/V passed around with collective-permute);
  all_gather  N devices, the sequence sharded, K/V all-gathered per layer.

Memory is XLA's own per-device figure for the compiled program
(``compiled.memory_analysis()``: temporaries, i.e. activations and attention buffers,
plus arguments and outputs), so it does not depend on the machine's load. Step times
are medians of ``--repeats`` runs; on N devices simulated on a few shared CPU cores
they mostly show the overhead of the extra work, not the speed-up N real devices give.

  python -m experiments.benchmarks.context_parallel --devices 4 \\
      --lengths 1024,2048,4096,8192 --out experiments/benchmarks/results
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import time
from typing import Any

MODES = ("none", "ring", "all_gather")


def _model_and_loss(length: int, layers: int, width: int, heads: int):
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from jaxformer.models import gpt  # pylint: disable=g-import-not-at-top
  cfg = gpt.gpt_nano(max_len=length, num_layers=layers, embed_dim=width,
                     num_heads=heads, mlp_dim=4 * width, dropout_rate=0.0,
                     attention_dropout_rate=0.0)
  model = gpt.GPT(cfg)

  def loss(params, tokens):
    logits = model.apply(params, tokens[:, :-1])
    logits = logits[0] if isinstance(logits, tuple) else logits
    logp = jax.nn.log_softmax(logits.astype(jnp.float32))
    return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1))

  return cfg, model, loss


def bench(mode: str, length: int, *, devices: int, layers: int, width: int, heads: int,
          repeats: int) -> dict[str, Any]:
  """Compiles and times one (mode, length); returns a row of numbers."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from jaxformer.attention import ring  # pylint: disable=g-import-not-at-top
  from jaxformer.training import sharding  # pylint: disable=g-import-not-at-top

  cfg, model, loss = _model_and_loss(length, layers, width, heads)
  n = 1 if mode == "none" else devices
  mesh = sharding.make_mesh((1, 1, 1, n), jax.devices()[:n])
  rules = sharding.make_rules()
  tokens = jnp.asarray(np.random.default_rng(0).integers(
      0, cfg.vocab_size, (1, length + 1)), jnp.int32)
  params = model.init(jax.random.key(0), tokens[:, :-1])
  with sharding.activate(mesh, rules), ring.context_parallel(
      "ring" if mode == "none" else mode):
    params = jax.device_put(params, sharding.replicated(mesh))
    step = jax.jit(jax.value_and_grad(loss))
    t0 = time.perf_counter()
    compiled = step.lower(params, tokens).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    hlo = compiled.as_text()
    jax.block_until_ready(compiled(params, tokens))   # warm-up
    times = []
    for _ in range(repeats):
      t0 = time.perf_counter()
      jax.block_until_ready(compiled(params, tokens))
      times.append(time.perf_counter() - t0)
  mib = 1 / 2**20
  return {
      "mode": mode, "length": length, "devices": n,
      "temp_mib": mem.temp_size_in_bytes * mib,
      "total_mib": (mem.temp_size_in_bytes + mem.argument_size_in_bytes
                    + mem.output_size_in_bytes - mem.alias_size_in_bytes) * mib,
      "step_s": statistics.median(times), "compile_s": compile_s,
      "collective_permutes": hlo.count("collective-permute-start")
                             or hlo.count("collective-permute("),
      "all_gathers": hlo.count("all-gather-start") or hlo.count("all-gather("),
  }


def table(rows: list[dict[str, Any]]) -> str:
  """Markdown: one line per length; memory per device and step time per mode."""
  by = {(r["mode"], r["length"]): r for r in rows}
  lengths = sorted({r["length"] for r in rows})
  modes = [m for m in MODES if any(r["mode"] == m for r in rows)]
  head = ["context length"]
  head += [f"{m}: MiB/device (temp)" for m in modes]
  head += [f"{m}: s/step" for m in modes]
  head += [f"{m} / none: memory, time" for m in modes if m != "none" and "none" in modes]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for length in lengths:
    cells = [str(length)]
    for m in modes:
      r = by.get((m, length))
      cells.append("" if r is None else f"{r['total_mib']:.1f} ({r['temp_mib']:.1f})")
    for m in modes:
      r = by.get((m, length))
      cells.append("" if r is None else f"{r['step_s']:.3f}")
    base = by.get(("none", length))
    for m in modes:
      if m == "none" or base is None:
        continue
      r = by.get((m, length))
      cells.append("" if r is None else
                   f"{r['total_mib'] / base['total_mib']:.2f}, "
                   f"{r['step_s'] / base['step_s']:.2f}")
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--devices", type=int, default=4,
                      help="simulated CPU devices = the context-axis size")
  parser.add_argument("--lengths", default="1024,2048,4096,8192")
  parser.add_argument("--modes", default=",".join(MODES))
  parser.add_argument("--layers", type=int, default=2)
  parser.add_argument("--width", type=int, default=128)
  parser.add_argument("--heads", type=int, default=4)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--out", default=None, help="directory for the .md and .json")
  args = parser.parse_args(argv)
  modes = args.modes.split(",")
  for m in modes:
    if m not in MODES:
      parser.error(f"--modes: {m!r} is not one of {MODES}")
  lengths = [int(x) for x in args.lengths.split(",")]
  if any(length % (2 * args.devices) for length in lengths):
    parser.error(f"--lengths must be multiples of 2 x --devices = {2 * args.devices}")

  import jax  # pylint: disable=g-import-not-at-top
  if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    jax.config.update("jax_num_cpu_devices", args.devices)
  rows = []
  for length in lengths:
    for mode in modes:
      row = bench(mode, length, devices=args.devices, layers=args.layers,
                  width=args.width, heads=args.heads, repeats=args.repeats)
      rows.append(row)
      print(json.dumps(row), flush=True)
  text = table(rows)
  print(text)
  if args.out:
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"context_parallel-{jax.default_backend()}-"
                        f"{datetime.date.today().isoformat()}")
    setup = (f"GPT {args.layers} layers x {args.width} wide, {args.heads} heads, batch 1, "
             f"float32; {args.devices} simulated {jax.default_backend()} devices; "
             f"jax {jax.__version__}")
    with open(stem + ".json", "w") as f:
      json.dump({"setup": setup, "rows": rows}, f, indent=1)
    with open(stem + ".md", "w") as f:
      f.write(f"# Context parallelism: memory per device and step time\n\n{setup}.\n"
              "Memory: XLA's compiled per-device figure (arguments + outputs + "
              "temporaries; temporaries in parentheses). Time: median of "
              f"{args.repeats} steps.\n\n{text}\n")
  return rows


if __name__ == "__main__":
  main()
