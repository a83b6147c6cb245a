"""The attention benchmark's pieces that run without a GPU: its peers list, one CPU
point, and the dispatch table it writes for the GPU default (read back by gpu_table)."""

from __future__ import annotations

import json
import os
import tempfile
from unittest import mock

from experiments.benchmarks import attention
from experiments.benchmarks import attention_lib
from jaxformer.attention import gpu_table


def _rows(pallas_ms, cudnn_ms):
  rows = []
  for impl, times in (("jaxformer/pallas", pallas_ms), ("jaxformer/cudnn", cudnn_ms),
                      ("jax.nn/xla", (9.0, 9.0))):
    for mode, ms in zip(("fwd", "fwd+bwd"), times):
      rows.append(attention_lib.Row(impl, mode, 4, 4096, 16, 128, True, ms=ms))
  return rows


def test_dispatch_table_round_trip_both_outcomes():
  env = dict(device="NVIDIA H100 80GB HBM3", date="2026-12-02T00:00:00")
  case = gpu_table.Case.of(4096, 4096, "bfloat16", True, 128)
  for pallas_ms, want in (((1.0, 3.0), True), ((1.0, 3.6), False)):
    with tempfile.TemporaryDirectory() as tmp:
      path = attention_lib.write_dispatch_table(tmp, _rows(pallas_ms, (1.1, 3.5)), env)
      with open(path) as f:
        table = json.load(f)
      assert {r["mode"] for r in table["cases"]} == {"fwd", "fwd+bwd"}
      assert os.path.basename(path) == "attention-dispatch-nvidia-h100-80gb-hbm3.json"
      with mock.patch.dict(os.environ, {gpu_table.ENV_VAR: tmp}):
        faster, reason = gpu_table.prefer_pallas(env["device"], case)
      assert faster is want, reason


def test_impls_list_ours_and_guards_missing_peers():
  impls = attention_lib.jax_impls(causal=True)
  for name in ("jaxformer/xla", "jaxformer/cudnn", "kernels/triton", "jax.nn/xla"):
    assert callable(impls[name]), name
  for name in ("kernels/mosaic_gpu", "jax-pallas/mgpu(fp16)", "tokamax"):
    assert name in impls  # a callable, or the reason it is skipped


def test_cpu_point_runs():
  result = attention.cpu_point("chunked", 128, "fwd+bwd", 1)
  assert result["ms"] > 0 and result["peak_rss_mib"] > 0
