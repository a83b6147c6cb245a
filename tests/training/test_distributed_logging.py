"""Distributed start-up decisions and the metrics logger (files, lines, MFU)."""

from __future__ import annotations

import io
import json
import os

import pytest

from jaxformer.training import distributed
from jaxformer.training import metrics_logger

EXPLICIT = {"coordinator_address": "10.0.0.1:1234", "num_processes": 2,
            "process_id": 1}


@pytest.mark.parametrize("config,env,want", [
    ({}, {}, None),                                            # one process
    ({"initialize": "never"}, {"SLURM_JOB_ID": "1", "SLURM_NTASKS": "4"}, None),
    (EXPLICIT, {}, EXPLICIT),
    ({}, {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4"}, {}),       # JAX auto-detects
    ({}, {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"}, None),     # single-task job
    ({}, {"TPU_WORKER_HOSTNAMES": "a,b,c,d"}, {}),
    ({}, {"TPU_WORKER_HOSTNAMES": "localhost"}, None),         # one-host TPU VM
    ({"initialize": "always"}, {}, {}),
    ({}, {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2",
          "JAX_PROCESS_ID": "0"},
     {"coordinator_address": "h:1", "num_processes": 2, "process_id": 0}),
])
def test_initialize_kwargs(config, env, want):
  assert distributed.initialize_kwargs(config, env) == want


@pytest.mark.parametrize("config,match", [
    ({"initialize": "maybe"}, "distributed.initialize='maybe'"),
    ({"coordinator_address": "h:1"}, r"not \['num_processes', 'process_id'\]"),
    ({**EXPLICIT, "process_id": 2}, "process_id=2"),
])
def test_initialize_kwargs_errors(config, match):
  with pytest.raises(ValueError, match=match):
    distributed.initialize_kwargs(config, {})


def test_detect_cluster():
  assert distributed.detect_cluster({}) is None
  assert distributed.detect_cluster({"JAX_COORDINATOR_ADDRESS": "h:1"}) == "env"
  assert distributed.detect_cluster({"SLURM_JOB_ID": "1", "SLURM_NTASKS": "2"}) == "slurm"
  assert distributed.detect_cluster({"TPU_PROCESS_ADDRESSES": "a:1,b:1"}) == "tpu"


def test_single_process_does_not_initialize():
  assert distributed.maybe_initialize({"initialize": "never"}) is False
  assert distributed.maybe_initialize(None) is (
      distributed.detect_cluster() is not None)
  assert distributed.is_logging_process()


class _FakeDevice:

  def __init__(self, platform, kind):
    self.platform = platform
    self.device_kind = kind


@pytest.mark.parametrize("platform,kind,want", [
    ("gpu", "NVIDIA H100 80GB HBM3", 989e12),
    ("gpu", "NVIDIA H200", 989e12),
    ("gpu", "NVIDIA A100-SXM4-40GB", 312e12),
    ("tpu", "TPU v4", 275e12),
    ("tpu", "TPU v5 lite", 197e12),
    ("tpu", "TPU v5p", 459e12),
    ("cpu", "cpu", None),
    ("gpu", "Some Future GPU", None),
])
def test_peak_flops_table(platform, kind, want):
  assert metrics_logger.peak_flops_per_device(_FakeDevice(platform, kind)) == want


def test_flops_per_token_formula():
  # GPT-2 small at 1024: 6 N + 12 L d T (PaLM appendix B)
  got = metrics_logger.flops_per_token(num_params=124_439_808, num_layers=12,
                                       width=768, seq_len=1024)
  assert got == 6 * 124_439_808 + 12 * 12 * 768 * 1024


def test_logger_writes_jsonl_lines_and_mfu(tmp_path):
  out = io.StringIO()  # not a TTY: plain lines
  log = metrics_logger.MetricsLogger(
      str(tmp_path), total_steps=100, tokens_per_step=1000, flops_per_step=1e9,
      peak_flops=1e12, tensorboard=True, stream=out)
  log.reset_timer(0)
  row = log.log_train(10, {"loss": 2.5, "skipped_steps": 0})
  erow = log.log_eval(10, {"loss": 2.25, "bits_per_byte": 3.2})
  log.close()
  with open(tmp_path / "metrics.jsonl") as f:
    rows = [json.loads(l) for l in f]
  assert rows[0]["step"] == 10 and rows[0]["loss"] == 2.5
  assert rows[0]["tokens_per_sec"] > 0 and 0 < rows[0]["mfu"]
  # MFU = achieved FLOP/s / peak: flops_per_step * steps / seconds / peak
  seconds = 10 * 1000 / rows[0]["tokens_per_sec"]
  assert rows[0]["mfu"] == pytest.approx(1e9 * 10 / seconds / 1e12, rel=1e-6)
  assert rows[1] == {"step": 10, "eval_loss": 2.25, "eval_bits_per_byte": 3.2}
  assert row["loss"] == 2.5 and erow["eval_loss"] == 2.25
  text = out.getvalue()
  assert "step 10/100 | loss 2.5000" in text and "ETA" in text
  assert "eval @ step 10" in text
  assert os.listdir(tmp_path / "tensorboard")


def test_logger_disabled_writes_nothing(tmp_path):
  out = io.StringIO()
  log = metrics_logger.MetricsLogger(str(tmp_path / "w"), total_steps=10,
                                     enabled=False, stream=out)
  row = log.log_train(5, {"loss": 1.0})
  log.close()
  assert row["loss"] == 1.0
  assert not os.path.exists(tmp_path / "w") and not out.getvalue()


def test_progress_bar_mode(tmp_path):
  out = io.StringIO()
  log = metrics_logger.MetricsLogger(str(tmp_path), total_steps=10, progress=True,
                                     tensorboard=False, tokens_per_step=10,
                                     stream=out)
  log.log_train(5, {"loss": 1.0})
  log.close()
  assert "5/10" in out.getvalue() and "loss=1.0000" in out.getvalue()
