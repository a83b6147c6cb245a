"""What every notebook shares: its size, where outputs go, and how runs are made.

A run is ``jaxformer.training.loop.train(config, workdir)`` on a config from
``experiments/configs`` with dotted overrides; nothing here trains by itself.

Sizes (``NOTEBOOK_SIZE``; ``FULL=1`` still means ``full``):
  * ``tiny`` (default): every arm end to end in a minute or two, one seed; what CI runs.
    A smoke test of the machinery, not a result.
  * ``cpu``: the committed results (``experiments/notebooks/results/``): sized to show
    real differences in about ten minutes per notebook on 2 CPU cores, with ``SEEDS``
    seeds per arm and mean ± std in every table.
  * ``full``: the real configs (an accelerator).
"""

from __future__ import annotations

import copy
import os
import pathlib
import shutil
import time
from collections.abc import Mapping
from typing import Any

import jax
from ml_collections import config_dict

from experiments import plotting
from jaxformer import compilation_cache
from jaxformer import tasks
from jaxformer.data import vocab
from jaxformer.models import registry
from jaxformer.training import loop

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
SIZES = ("tiny", "cpu", "full")
SEEDS = {"tiny": (0,), "cpu": (0, 1, 2), "full": (0, 1, 2)}


def size() -> str:
  """The notebook size: ``$NOTEBOOK_SIZE`` (tiny | cpu | full), ``full`` if ``FULL=1``."""
  if os.environ.get("FULL") == "1":
    return "full"
  value = os.environ.get("NOTEBOOK_SIZE") or "tiny"
  if value not in SIZES:
    raise ValueError(f"NOTEBOOK_SIZE={value!r}; expected one of {SIZES}")
  return value


def runs_dir(name: str) -> pathlib.Path:
  """Where a notebook's training workdirs go: ``$RUNS_DIR/<name>`` or ``<out_dir>/runs``.

  Kept apart from the outputs so that committing ``results/`` never takes checkpoints.
  """
  root = os.environ.get("RUNS_DIR")
  path = pathlib.Path(root) / name if root else out_dir(name) / "runs"
  path.mkdir(parents=True, exist_ok=True)
  return path


def use_compilation_cache(path: str | os.PathLike[str] | None = None) -> None:
  """JAX's persistent compilation cache (seeds of one arm compile once).

  Default ``experiments/notebooks/out/jax_cache`` (git-ignored); every compilation is
  cached, however short, since a notebook's runs repeat the same programs. A cache
  already configured by the environment (``JAX_COMPILATION_CACHE_DIR``, as the test
  suite sets for the notebooks it runs) is kept
  (:func:`jaxformer.compilation_cache.use_compilation_cache`).
  """
  if path is None and os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    return
  compilation_cache.use_compilation_cache(
      path or REPO_ROOT / "experiments" / "notebooks" / "out" / "jax_cache",
      min_compile_secs=0.0, max_bytes=4 << 30)


def show_table(text: str) -> None:
  """A markdown table: rendered in a notebook, printed in a script."""
  try:
    from IPython import display, get_ipython  # pylint: disable=g-import-not-at-top
  except ImportError:  # pragma: no cover - IPython is a test dependency
    get_ipython = lambda: None  # noqa: E731
  if get_ipython() is not None:
    display.display(display.Markdown(text))
  else:
    print(text)


def out_dir(name: str) -> pathlib.Path:
  """``$OUT_DIR`` or ``experiments/notebooks/out/<name>/`` (git-ignored), created."""
  path = pathlib.Path(os.environ.get("OUT_DIR") or
                      REPO_ROOT / "experiments" / "notebooks" / "out" / name)
  path.mkdir(parents=True, exist_ok=True)
  return path


def with_overrides(config: config_dict.ConfigDict,
                   overrides: Mapping[str, Any] | None = None) -> config_dict.ConfigDict:
  """A copy of ``config`` with ``{"model.norm": "post", ...}`` applied.

  Sections must exist (ValueError otherwise); leaves may be new, e.g. a model field the
  config file leaves at its dataclass default (``train`` rejects unknown model fields).
  """
  config = copy.deepcopy(config)  # keeps references (model.nsp_head -> task_options.nsp)
  for key, value in (overrides or {}).items():
    node = config
    *parents, leaf = key.split(".")
    for part in parents:
      if part not in node:
        raise ValueError(f"override {key!r}: the config has no section {part!r}")
      node = node[part]
    node[leaf] = value   # a new leaf is fine: train() checks model fields by name
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
      **({"task_options.sample_tokens": 0}
         if "sample_tokens" in config.get("task_options", {}) else {}),
  })


def train_run(config: config_dict.ConfigDict, workdir: str | os.PathLike[str], *,
              overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
  """Trains ``config`` (+ ``overrides``) from scratch in ``workdir``; returns the summary.

  ``workdir`` is emptied first (``train`` would otherwise resume from it). The summary
  gains ``workdir`` and ``run_seconds`` (wall time including compilation).
  """
  config = notebook_settings(with_overrides(config, overrides))
  workdir = pathlib.Path(workdir)
  if workdir.exists():
    shutil.rmtree(workdir)
  workdir.mkdir(parents=True)
  start = time.perf_counter()
  summary = loop.train(config, str(workdir))
  summary = dict(summary)
  summary["workdir"] = str(workdir)
  summary["run_seconds"] = time.perf_counter() - start
  return summary


def train_seeds(config: config_dict.ConfigDict, runs: str | os.PathLike[str],
                label: str, seeds: tuple[int, ...], *,
                overrides: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
  """``train_run`` once per seed (``train.seed``: initialisation and data order).

  Workdirs are ``<runs>/<label>/s<seed>``; returns the summaries in seed order, each
  with ``seed`` added.
  """
  summaries = []
  for seed in seeds:
    summary = train_run(config, pathlib.Path(runs) / label / f"s{seed}",
                        overrides={**dict(overrides or {}), "train.seed": seed})
    summary["seed"] = seed
    summaries.append(summary)
  return summaries


def final_train_loss(workdir: str | os.PathLike[str], last: int = 3) -> float:
  """Mean of the last ``last`` logged train losses (less noisy than the final one)."""
  _, losses = plotting.series(plotting.read_metrics(workdir), "loss")
  return float(losses[-last:].mean())


def load_params(workdir: str | os.PathLike[str]) -> Any:
  """The parameters of the newest checkpoint in ``<workdir>/checkpoints`` (host arrays)."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  manager = ocp.CheckpointManager(pathlib.Path(workdir).resolve() / "checkpoints",
                                  item_names=("state",))
  step = manager.latest_step()
  if step is None:
    raise ValueError(f"load_params: no checkpoint under {workdir}/checkpoints")
  restored = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore()))
  manager.close()
  return restored["state"]["params"]


def trained_model(config: config_dict.ConfigDict, workdir: str | os.PathLike[str]
                  ) -> tuple[Any, Any]:
  """``(model, params)`` of a finished run of ``config`` in ``workdir``."""
  _, model = registry.build_model(config.model)
  return model, load_params(workdir)


def token_baselines(config: config_dict.ConfigDict,
                    num_batches: int | None = None) -> dict[str, float]:
  """What a model that ignores the context gets on the held-out tokens of ``config``.

  Over the real, non-special tokens of ``num_batches`` (default ``train.eval_batches``)
  eval batches (the positions a masked-LM scores are drawn uniformly from these):
  ``unigram_entropy_nats``, the entropy of their own frequencies (the loss of the best
  context-free predictor), and ``most_frequent_accuracy`` / ``most_frequent_token``,
  the accuracy of always guessing the commonest one.
  """
  import numpy as np  # pylint: disable=g-import-not-at-top
  model_cfg, _ = registry.build_model(config.model)
  tokenizer = vocab.build_tokenizer(config.data)
  task = tasks.task_class(config.task)(config.data, dict(config.get("task_options") or {}),
                                       tokenizer=tokenizer, model_config=model_cfg)
  batches = task.batches(batch_size=config.data.eval_batch_size, seed=0, train=False)
  special = set(int(i) for i in tokenizer.special_ids)
  counts: dict[int, int] = {}
  for _ in range(num_batches or config.train.eval_batches):
    batch = next(batches)
    ids = np.asarray(batch["inputs"])
    valid = np.asarray(batch.get("inputs_mask", np.ones(ids.shape, bool)), bool)
    for token, n in zip(*np.unique(ids[valid], return_counts=True)):
      if int(token) not in special:
        counts[int(token)] = counts.get(int(token), 0) + int(n)
  freq = np.asarray(list(counts.values()), np.float64)
  p = freq / freq.sum()
  top = max(counts, key=counts.get)
  return {"unigram_entropy_nats": float(-(p * np.log(p)).sum()),
          "most_frequent_accuracy": float(p.max()), "most_frequent_token": top,
          "num_tokens": int(freq.sum())}


def evaluate(config: config_dict.ConfigDict, params: Any, *,
             task_options: Mapping[str, Any] | None = None,
             num_batches: int | None = None) -> dict[str, float]:
  """Held-out metrics of ``params`` under ``config`` with some task options changed.

  E.g. every masked-LM run scored at the same 15% mask rate
  (``task_options={"mask_rate": 0.15}``). Uses the run's own eval pipeline and task;
  metrics are averaged over ``num_batches`` (default ``train.eval_batches``) batches,
  weighted by their ``num_tokens``.
  """
  model_cfg, model = registry.build_model(config.model)
  tokenizer = vocab.build_tokenizer(config.data)
  options = {**dict(config.get("task_options") or {}), **dict(task_options or {})}
  task = tasks.task_class(config.task)(config.data, options, tokenizer=tokenizer,
                                       model_config=model_cfg)
  step = jax.jit(lambda p, b: task(model, p, b, None, True)[1])
  batches = task.batches(batch_size=config.data.eval_batch_size, seed=0, train=False)
  totals: dict[str, float] = {}
  weight = 0.0
  for _ in range(num_batches or config.train.eval_batches):
    metrics = jax.device_get(step(params, next(batches)))
    n = float(metrics["num_tokens"])
    weight += n
    for key, value in metrics.items():
      if key != "num_tokens":
        totals[key] = totals.get(key, 0.0) + float(value) * n
  return {key: value / max(weight, 1e-9) for key, value in totals.items()}
