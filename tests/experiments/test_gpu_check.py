"""gpu_check without a GPU: the dry run's plan and estimate, the device-clock loop, the
dispatch table it writes, and the whole command end to end at the CPU's tiny size."""

from __future__ import annotations

import json
import os
import pathlib
import re
import subprocess
import sys
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.benchmarks import gpu_check
from jaxformer.attention import gpu_table


def test_dry_run_plans_the_issue_cases_within_eight_minutes(capsys):
  result = gpu_check.main(["--dry-run"])
  lines = capsys.readouterr().out.strip().splitlines()
  match = re.fullmatch(r"estimated H100 time: (\d+) s", lines[-1])
  assert match, lines[-1]
  assert int(match.group(1)) <= 480
  assert abs(int(match.group(1)) - result["estimate_s"]) < 1
  plan = gpu_check.speed_plan(gpu_check.FULL)
  shapes = {(s.head_dim, s.seq, s.batch * s.seq, s.heads * s.head_dim) for s in plan}
  assert shapes == {(128, 2048, 16384, 2048), (128, 8192, 16384, 2048),
                    (128, 16384, 16384, 2048), (64, 8192, 16384, 2048),
                    (256, 8192, 16384, 2048)}
  assert {(s.impl, s.mode, s.causal) for s in plan} == {
      (i, m, c) for i in ("pallas", "cudnn", "xla") for m in ("fwd", "fwd+bwd")
      for c in (False, True)}
  assert all(s.impl == "xla" and "GiB" in s.skip for s in plan if s.skip)
  checks = gpu_check.check_plan(gpu_check.FULL)
  assert {c.head_dim for c in checks} == {64, 128, 256}
  assert any(c.causal for c in checks) and any(c.segments for c in checks)
  assert any(c.heads != c.kv_heads for c in checks)
  assert any(c.head_dim != c.head_dim_v for c in checks)


def test_flags_restrict_the_plan_and_the_estimate(capsys):
  full = gpu_check.main(["--dry-run"])["estimate_s"]
  part = gpu_check.main(["--dry-run", "--only", "kernel", "--head-dims", "128",
                         "--seq-lens", "2048"])
  capsys.readouterr()
  assert part["estimate_s"] < full
  names = [n for n, _ in part["parts"]]
  assert not any(n.startswith("train") for n in names)
  speed = [n for n in names if n.startswith("speed")]
  assert len(speed) == 3 * 2 * 2 and all("hd128 L2048" in n for n in speed)
  train = gpu_check.main(["--dry-run", "--only", "train"])
  capsys.readouterr()
  assert [n for n, _ in train["parts"]][1:] == ["train gpt2_small default",
                                               "train gpt2_small pallas"]
  with pytest.raises(SystemExit):
    gpu_check.main(["--dry-run", "--head-dims", "96"])


def test_budget_skips_cases_that_would_end_past_it():
  case = gpu_check.speed_plan(gpu_check.FULL, (128,), (2048,))[0]
  assert gpu_check.within_budget(case, gpu_check.FULL, 10.0, 450.0) is case
  late = gpu_check.within_budget(case, gpu_check.FULL, 449.0, 450.0)
  assert late.skip.startswith("time budget")


def test_loop_runs_n_sequential_calls():
  q = jnp.full((1, 4, 1, 8), 3.0)
  calls = gpu_check.looped(lambda q, k, v: 2.0 * q, "fwd")
  for n in (1, 5):  # one program, any count: each call adds 2 * q[0,0,0,0]
    np.testing.assert_allclose(calls(n, q, q, q, q), 6.0 * n, rtol=1e-6)
  grads = gpu_check.looped(lambda q, k, v: q * k + v, "fwd+bwd")
  # d/dq = k * dout = 3, d/dk = q * dout = 3, d/dv = dout = 1 per call.
  np.testing.assert_allclose(grads(3, q, q, q, jnp.ones_like(q)), 3 * 7.0, rtol=1e-6)


def test_dispatch_table_prefers_pallas_only_where_faster_than_cudnn(tmp_path):
  env = dict(device="NVIDIA H100 80GB HBM3", date="2026-12-06T00:00:00+00:00")
  base = dict(batch=2, seq=8192, heads=16, head_dim=128, causal=True, skip="")
  rows = [dict(base, impl=impl, mode=mode, ms=ms)
          for impl, times in (("pallas", (1.0, 3.0)), ("cudnn", (1.2, 2.9)),
                              ("xla", (9.0, 30.0)))
          for mode, ms in zip(("fwd", "fwd+bwd"), times)]
  table = gpu_check.dispatch_table(rows, env)
  path = tmp_path / gpu_table.table_filename(env["device"])
  path.write_text(json.dumps(table))
  assert {r["mode"] for r in gpu_table.load_table(path)["cases"]} == {"fwd", "fwd+bwd"}
  case = gpu_table.Case.of(8192, 8192, "bfloat16", True, 128)
  with mock.patch.dict(os.environ, {gpu_table.ENV_VAR: str(tmp_path)}):
    faster, reason = gpu_table.prefer_pallas(env["device"], case)
  assert not faster and "fwd+bwd: pallas 3.000 ms vs cudnn 2.900 ms" in reason


@pytest.mark.slow
def test_tiny_run_on_cpu_writes_both_files(tmp_path, capsys):
  if jax.default_backend() != "cpu":
    pytest.skip("the tiny size is the CPU's")
  result = gpu_check.main(["--out", str(tmp_path)])
  out = capsys.readouterr().out
  assert re.search(r"elapsed: [\d.]+ s", out.strip().splitlines()[-1])
  statuses = {(r["backend"], r["status"]) for r in result["checks"]}
  assert statuses == {("mosaic_gpu", "skip"), ("cudnn", "skip"), ("triton", "ok"),
                      ("xla", "ok")}, result["checks"]
  timed = {(r["impl"], r["mode"]) for r in result["speed"] if "ms" in r}
  assert timed == {("pallas", "fwd"), ("pallas", "fwd+bwd"), ("xla", "fwd"),
                   ("xla", "fwd+bwd")}
  assert [r["attention"] for r in result["train"]] == ["default", "pallas"]
  assert all(np.isfinite(r["loss"]) and r["step_ms"] > 0 for r in result["train"])
  table_path = tmp_path / gpu_table.table_filename("cpu")
  table = gpu_table.load_table(table_path)
  assert table["device_kind"] == "cpu" and table["cases"]
  assert all(set(r["ms"]) == {"pallas", "xla"} for r in table["cases"])
  with mock.patch.dict(os.environ, {gpu_table.ENV_VAR: str(tmp_path)}):
    faster, reason = gpu_table.prefer_pallas(
        "cpu", gpu_table.Case.of(64, 64, "bfloat16", True, 32))
  assert not faster and "no pallas/cudnn times" in reason  # no cuDNN: never Pallas
  (md,) = pathlib.Path(tmp_path).glob("gpu-check-cpu-*.md")
  text = md.read_text()
  for needle in ("Device: cpu", f"jax {jax.__version__}", "Date: ", "## Correctness",
                 "## Speed", "## Training"):
    assert needle in text, needle


def test_timed_programs_lower_for_a_hopper_gpu():
  """The device-clock loop around our kernel (fwd+bwd) exports for cuda on a CPU: the
  three Mosaic GPU kernels inside one while loop (ptxas runs only on the GPU)."""
  from tests.kernels import mosaic_gpu_interpret  # pylint: disable=g-import-not-at-top
  x = jax.ShapeDtypeStruct((1, 256, 2, 64), jnp.bfloat16)
  prog = gpu_check.looped(gpu_check.speed_fn("pallas", True), "fwd+bwd")
  with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh(
      (), (), abstract_device=mosaic_gpu_interpret.H100)):
    text = jax.export.export(prog, platforms=["cuda"])(
        jax.ShapeDtypeStruct((), jnp.int32), x, x, x, x).mlir_module()
  assert len(re.findall(r"custom_call @mosaic_gpu", text)) == 3
  assert "stablehlo.while" in text


def test_a_kernel_that_failed_its_check_is_left_out_of_the_dispatch_table():
  checks = [dict(backend="triton", status="FAIL"), dict(backend="xla", status="ok")]
  assert gpu_check.untrusted(checks) == ("pallas",)  # on a CPU, ours is Triton
  assert gpu_check.untrusted([dict(backend="mosaic_gpu", status="ERROR")]) == ()
  rows = [dict(impl=i, mode="fwd", seq=2048, causal=False, head_dim=128, ms=1.0)
          for i in ("pallas", "cudnn")]
  env = dict(device="cpu")
  (case,) = gpu_check.dispatch_table(rows, env, exclude=("pallas",))["cases"]
  assert case["ms"] == {"cudnn": 1.0}


def test_imports_nothing_the_gpu_machine_lacks():
  """The GPU machine has jax, numpy, flax, optax but not grain or ml_collections."""
  code = ("import sys, experiments.benchmarks.gpu_check, jaxformer.models.gpt, "
          "jaxformer.training.metrics_logger, kernels.flash_attention, optax\n"
          "bad = {'grain', 'ml_collections', 'tensorflow', 'torch'} & "
          "{m.split('.')[0] for m in sys.modules}\n"
          "assert not bad, bad")
  subprocess.run([sys.executable, "-c", code], check=True,
                 cwd=pathlib.Path(__file__).parents[2])
