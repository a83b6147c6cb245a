"""experiments/benchmarks/cpu_profile.py: per-thread working and waiting time read
from a trace, and the config overrides."""

from __future__ import annotations

import gzip
import json

import pytest

from experiments.benchmarks import cpu_profile as cp


def _trace(tmp_path, events):
  path = tmp_path / "perfetto_trace.json.gz"
  with gzip.open(path, "wt") as f:
    json.dump({"traceEvents": events}, f)
  return path


def test_thread_busy_splits_working_and_waiting(tmp_path):
  meta = [{"ph": "M", "name": "thread_name", "pid": 1, "tid": t, "args": {"name": n}}
          for t, n in ((1, "python"), (2, "tf_XLAEigen/1"))]
  x = lambda tid, name, ts, dur: {"ph": "X", "pid": 1, "tid": tid, "name": name,  # noqa: E731
                                  "ts": ts, "dur": dur}
  events = meta + [
      x(1, "PjitFunction(step)", 0, 10_000),              # 10 ms, of which
      x(1, "Wait for LaunchOnDevice completion", 2_000, 8_000),   # 8 ms waiting
      x(1, "$sharding.py shard_batch", 12_000, 1_000),     # 1 ms working
      x(2, "ThunkExecutor::Execute", 0, 9_000),           # 9 ms, nested
      x(2, "all-reduce", 5_000, 3_000),
      x(2, "Rendezvous", 5_000, 2_000),                   # 2 ms waiting
  ]
  got = cp.thread_busy(_trace(tmp_path, events))
  assert got["span_s"] == pytest.approx(0.013)
  rows = {r["thread"]: r for r in got["threads"]}
  assert rows["python"]["traced_s"] == pytest.approx(0.011)
  assert rows["python"]["waiting_s"] == pytest.approx(0.008)
  assert rows["python"]["working_s"] == pytest.approx(0.003)
  assert rows["tf_XLAEigen/1"]["working_s"] == pytest.approx(0.007)
  assert [r["thread"] for r in got["threads"]] == ["tf_XLAEigen/1", "python"]
  assert cp.thread_busy(_trace(tmp_path, meta)) == {"span_s": 0.0, "threads": []}


def test_config_overrides():
  c = cp._config("experiments/configs/gpt_bytes.py:tiny",
                 ["--config.train.num_steps=7", "--config.data.source=stdlib_text",
                  "--config.sharding.cpu_devices=0"])
  assert (c.train.num_steps, c.data.source, c.sharding.cpu_devices) == (
      7, "stdlib_text", 0)
  assert c.model.num_layers == 2   # the tiny variant
