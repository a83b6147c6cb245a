"""What every notebook shares: where outputs go and how one short training run is made.

A run is ``jaxformer.training.loop.train(config, workdir)`` on a config from
``experiments/configs`` with dotted overrides; nothing here trains by itself.
"""

from __future__ import annotations

import contextlib
import copy
import os
import pathlib
import shutil
import time
from collections.abc import Mapping
from typing import Any

from ml_collections import config_dict

from experiments import plotting
from jaxformer.training import loop

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]


def full_size() -> bool:
  """True when the environment asks for the full-size runs (``FULL=1``)."""
  return os.environ.get("FULL") == "1"


def out_dir(name: str) -> pathlib.Path:
  """``$OUT_DIR`` or ``experiments/notebooks/out/<name>/`` (git-ignored), created."""
  path = pathlib.Path(os.environ.get("OUT_DIR") or
                      REPO_ROOT / "experiments" / "notebooks" / "out" / name)
  path.mkdir(parents=True, exist_ok=True)
  return path


def with_overrides(config: config_dict.ConfigDict,
                   overrides: Mapping[str, Any] | None = None) -> config_dict.ConfigDict:
  """A copy of ``config`` with ``{"model.norm": "post", ...}`` applied (ValueError on a
  field the config does not have)."""
  config = copy.deepcopy(config)   # keeps field references (model.nsp_head -> task_options.nsp)
  for key, value in (overrides or {}).items():
    node = config
    *parents, leaf = key.split(".")
    for part in parents:
      if part not in node:
        raise ValueError(f"override {key!r}: the config has no section {part!r}")
      node = node[part]
    if leaf not in node:
      raise ValueError(f"override {key!r}: {'.'.join(parents) or 'config'} has no field "
                       f"{leaf!r}; it has {sorted(node.keys())}")
    node[leaf] = value
  return config


def notebook_settings(config: config_dict.ConfigDict) -> config_dict.ConfigDict:
  """Quiet, synchronous settings for short runs inside a notebook (a copy)."""
  train = config.train
  return with_overrides(config, {
      "train.progress": False,
      "train.tensorboard": False,
      "train.async_checkpoint": False,
      "train.checkpoint_every": max(train.num_steps, 1),
      "train.keep_checkpoints": 1,
      **({"train.sample_tokens": 0} if "sample_tokens" in train else {}),
  })


def train_run(config: config_dict.ConfigDict, workdir: str | os.PathLike[str], *,
              overrides: Mapping[str, Any] | None = None,
              context: contextlib.AbstractContextManager | None = None
              ) -> dict[str, Any]:
  """Trains ``config`` (+ ``overrides``) from scratch in ``workdir``; returns the summary.

  ``workdir`` is emptied first (``train`` would otherwise resume from it). ``context``
  (e.g. ``jaxformer.analysis.override_attention(hard=True)``) is active for the whole
  run, so every step is traced inside it. The summary gains ``workdir`` and
  ``run_seconds`` (wall time including compilation).
  """
  config = notebook_settings(with_overrides(config, overrides))
  workdir = pathlib.Path(workdir)
  if workdir.exists():
    shutil.rmtree(workdir)
  workdir.mkdir(parents=True)
  start = time.perf_counter()
  with context if context is not None else contextlib.nullcontext():
    summary = loop.train(config, str(workdir))
  summary = dict(summary)
  summary["workdir"] = str(workdir)
  summary["run_seconds"] = time.perf_counter() - start
  return summary


def final_train_loss(workdir: str | os.PathLike[str], last: int = 3) -> float:
  """Mean of the last ``last`` logged train losses (less noisy than the final one)."""
  _, losses = plotting.series(plotting.read_metrics(workdir), "loss")
  return float(losses[-last:].mean())
