"""The context-parallel benchmark's table and argument checks (its runs need several
devices: the committed results come from running it by hand)."""

from __future__ import annotations

import pytest

from experiments.benchmarks import context_parallel


def _row(mode, length, total, step):
  return {"mode": mode, "length": length, "devices": 4, "temp_mib": total - 1.0,
          "total_mib": total, "step_s": step}


def test_table_has_ratios_against_no_context_parallelism():
  rows = [_row("none", 1024, 40.0, 1.0), _row("ring", 1024, 10.0, 1.5),
          _row("all_gather", 1024, 20.0, 0.5)]
  lines = context_parallel.table(rows).splitlines()
  assert lines[0].startswith("| context length | none: MiB/device (temp) |")
  assert lines[2] == ("| 1024 | 40.0 (39.0) | 10.0 (9.0) | 20.0 (19.0) | 1.000 | 1.500 | "
                      "0.500 | 0.25, 1.50 | 0.50, 0.50 |")


@pytest.mark.parametrize("argv", [["--lengths", "1001"], ["--modes", "ring,zigzag"]])
def test_bad_arguments_are_refused(argv):
  with pytest.raises(SystemExit):
    context_parallel.main(argv)
