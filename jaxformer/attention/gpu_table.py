"""The GPU default follows measurements: cuDNN unless a benchmark table says ours wins.

``experiments/benchmarks/gpu_check.py`` (the one GPU call; also the long sweep
``attention.py``) writes, per device kind, a machine-readable
table ``attention-dispatch-<device>.json`` beside its results
(``experiments/benchmarks/results/``, committed). ``dot_product_attention`` with
``implementation=None`` on a GPU reads the table of the device it runs on and picks the
Pallas kernel over cuDNN only for a case the table shows it faster in every measured mode
(forward and forward+backward: the dispatcher cannot know whether the call will be
differentiated). No table, no entry for the case, or cuDNN faster: cuDNN.

A case is ``(seq_bucket, dtype, causal, head_dim)``, ``seq_bucket`` being the next power
of two of ``max(Lq, Lk)``. Tables are looked up in the directories of the environment
variable ``JAXFORMER_ATTENTION_TABLES`` (``os.pathsep``-separated), then in the
``results/`` folder of the installed ``experiments.benchmarks`` package (a checkout, or
a wheel: pyproject packages the JSON), found without importing its modules.

File format: ``{"format": 1, "device_kind": str, "environment": {...}, "cases":
[{"seq_bucket": int, "dtype": str, "causal": bool, "head_dim": int, "mode": "fwd" |
"fwd+bwd", "ms": {"pallas": float, "cudnn": float, ...}}]}`` (other keys of ``ms``,
e.g. ``"xla"``, are kept for reading and ignored by the choice).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import math
import os
import pathlib
import re

import numpy as np

FORMAT = 1
ENV_VAR = "JAXFORMER_ATTENTION_TABLES"
MODES = ("fwd", "fwd+bwd")


@dataclasses.dataclass(frozen=True)
class Case:
  """What a table row is about."""

  seq_bucket: int
  dtype: str
  causal: bool
  head_dim: int

  @classmethod
  def of(cls, q_len: int, kv_len: int, dtype, causal: bool, head_dim: int) -> Case:
    return cls(seq_bucket=1 << max(max(q_len, kv_len) - 1, 0).bit_length(),
               dtype=np.dtype(dtype).name, causal=bool(causal), head_dim=int(head_dim))


def table_filename(device_kind: str) -> str:
  """``attention-dispatch-<device kind, lowercase, [a-z0-9-]>.json``."""
  slug = re.sub(r"[^a-z0-9]+", "-", device_kind.lower()).strip("-")
  return f"attention-dispatch-{slug}.json"


def table_dirs() -> list[pathlib.Path]:
  """Where tables are looked for, in order (module docstring)."""
  dirs = [pathlib.Path(d) for d in os.environ.get(ENV_VAR, "").split(os.pathsep) if d]
  try:
    spec = importlib.util.find_spec("experiments.benchmarks")
  except (ImportError, ValueError):
    spec = None
  if spec is not None and spec.submodule_search_locations:
    dirs += [pathlib.Path(d) / "results" for d in spec.submodule_search_locations]
  return dirs


def find_table(device_kind: str) -> pathlib.Path | None:
  """The first table for ``device_kind`` on the search path, or None."""
  for directory in table_dirs():
    path = directory / table_filename(device_kind)
    if path.is_file():
      return path
  return None


def load_table(path: str | os.PathLike) -> dict:
  """Reads and checks a table; cached per (path, modification time)."""
  path = pathlib.Path(path)
  return _load(str(path.resolve()), path.stat().st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _load(path: str, mtime_ns: int) -> dict:
  del mtime_ns  # part of the cache key only: an edited file is read again
  with open(path, encoding="utf-8") as f:
    table = json.load(f)
  if not isinstance(table, dict) or table.get("format") != FORMAT:
    raise ValueError(f"{path}: not an attention dispatch table (format {FORMAT})")
  for row in table.get("cases", []):
    if row.get("mode") not in MODES or not isinstance(row.get("ms"), dict):
      raise ValueError(f"{path}: bad row {row}; expected mode in {MODES} and an 'ms' dict")
  return table


def prefer_pallas(device_kind: str, case: Case) -> tuple[bool, str]:
  """Whether the table for ``device_kind`` shows Pallas faster than cuDNN for ``case``.

  Returns:
    ``(choice, reason)``: the reason names the table and the measured times, or says
    why there is no measurement.
  """
  path = find_table(device_kind)
  if path is None:
    return False, (f"no benchmark table for {device_kind!r} ({table_filename(device_kind)}"
                   f" in {[str(d) for d in table_dirs()]})")
  rows = [r for r in load_table(path).get("cases", [])
          if Case(r.get("seq_bucket"), r.get("dtype"), r.get("causal"),
                  r.get("head_dim")) == case]
  times = {r["mode"]: (r["ms"].get("pallas"), r["ms"].get("cudnn")) for r in rows}
  times = {m: t for m, t in times.items()
           if all(isinstance(x, (int, float)) and math.isfinite(x) for x in t)}
  if not times:
    return False, f"{path.name} has no pallas/cudnn times for {case}"
  shown = ", ".join(f"{m}: pallas {p:.3f} ms vs cudnn {c:.3f} ms"
                    for m, (p, c) in sorted(times.items()))
  wins = all(p < c for p, c in times.values())
  return wins, f"{path.name} for {case}: {shown}"
