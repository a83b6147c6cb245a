"""The train-step benchmark runs and writes its JSON."""

from __future__ import annotations

import json

import pytest

from experiments.benchmarks import train_step


@pytest.mark.slow
def test_benchmark_writes_table_and_json(tmp_path, capsys):
  rows = train_step.main(["--presets", "tiny", "--steps", "2", "--repeats", "1",
                          "--out", str(tmp_path)])
  assert rows[0]["preset"] == "tiny" and rows[0]["step_ms"] > 0
  assert rows[0]["tokens_per_s"] == pytest.approx(8 * 16 / (rows[0]["step_ms"] / 1e3))
  data = json.loads((tmp_path / "train_step-cpu.json").read_text())
  assert data["rows"][0]["params"] == rows[0]["params"]
  assert "ms/step" in capsys.readouterr().out


def test_unknown_preset_is_rejected():
  with pytest.raises(SystemExit):
    train_step.main(["--presets", "huge"])
