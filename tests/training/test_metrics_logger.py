"""metrics.jsonl repair on (re)start, NaN as null, and the finished-run summary."""

from __future__ import annotations

import json
import logging
import math

import pytest

from jaxformer.training import metrics_logger


def _strict_rows(path):
  def refuse(name):
    raise ValueError(f"not strict JSON: {name}")
  with open(path) as f:
    return [json.loads(line, parse_constant=refuse) for line in f]


def _write(path, rows, tail=""):
  with open(path, "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)
    f.write(tail)


ROWS = [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.5},
        {"step": 2, "eval_loss": 2.6}, {"step": 2, "config_changes": {}},
        {"step": 3, "loss": 2.4}, {"step": 4, "loss": 2.2}]


def test_resume_metrics_drops_rows_after_the_step_and_a_partial_line(tmp_path, caplog):
  path = tmp_path / "metrics.jsonl"
  _write(path, ROWS, tail='{"step": 5, "lo')
  with caplog.at_level(logging.WARNING):
    last_train, last_eval = metrics_logger.resume_metrics(str(tmp_path), 2)
  assert "line 7" in caplog.text and '{"step": 5, "lo' in caplog.text
  assert _strict_rows(path) == ROWS[:3]  # the step-2 config_changes row is redone
  assert last_train == ROWS[1] and last_eval == ROWS[2]


def test_resume_metrics_from_scratch_drops_everything(tmp_path):
  # a run killed before its first checkpoint restarts at step 0
  _write(tmp_path / "metrics.jsonl", ROWS)
  assert metrics_logger.resume_metrics(str(tmp_path), 0) == ({}, {})
  assert _strict_rows(tmp_path / "metrics.jsonl") == []
  assert metrics_logger.resume_metrics(str(tmp_path / "none"), 3) == ({}, {})


def test_resume_metrics_keeps_a_complete_file_untouched(tmp_path):
  path = tmp_path / "metrics.jsonl"
  _write(path, ROWS)
  before = path.stat().st_mtime_ns
  assert metrics_logger.resume_metrics(str(tmp_path), 4)[0] == ROWS[-1]
  assert path.stat().st_mtime_ns == before


def test_nan_and_inf_are_written_as_null(tmp_path):
  logger = metrics_logger.MetricsLogger(str(tmp_path), total_steps=3,
                                        tensorboard=False, progress=False)
  row = logger.log_train(1, {"loss": float("nan"), "grad_norm": float("inf")})
  assert math.isnan(row["loss"])  # the returned row keeps the float
  logger.log_eval(1, {"loss": float("nan")})
  logger.log_row({"step": 1, "note": -math.inf})
  logger.close()
  rows = _strict_rows(tmp_path / "metrics.jsonl")
  assert rows[0]["loss"] is None and rows[0]["grad_norm"] is None
  assert rows[1] == {"step": 1, "eval_loss": None}
  assert rows[2] == {"step": 1, "note": None}
  assert metrics_logger.json_safe({"a": 1.0, "b": float("nan"), "c": "x"}) == {
      "a": 1.0, "b": None, "c": "x"}


def test_finished_summary_returns_the_saved_one_or_writes_it(tmp_path, capsys):
  logger = metrics_logger.MetricsLogger(str(tmp_path), total_steps=4,
                                        tensorboard=False, progress=False)
  saved = {"step": 4, "preempted": False, "loss": 2.2, "eval_loss": 2.3}
  (tmp_path / "summary.json").write_text(json.dumps(saved))
  assert metrics_logger.finished_summary(logger, str(tmp_path), 4, 4, {}) == saved
  assert "nothing to do" in capsys.readouterr().out
  assert json.loads((tmp_path / "summary.json").read_text()) == saved
  (tmp_path / "summary.json").unlink()  # killed after the last checkpoint
  summary = metrics_logger.finished_summary(logger, str(tmp_path), 4, 4, ROWS[-1])
  assert summary == {"step": 4, "preempted": False, "loss": 2.2}
  assert json.loads((tmp_path / "summary.json").read_text()) == summary
  logger.close()


if __name__ == "__main__":
  pytest.main([__file__])
