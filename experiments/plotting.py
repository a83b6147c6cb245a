"""Matplotlib helpers for the notebooks: attention heat maps, rollouts, curves, tables.

Every ``plot_*`` function returns the figure and, given ``path``, also writes it (PNG);
nothing here trains or computes attention (that is ``jaxformer.analysis``).
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import sys

import matplotlib

if "ipykernel" not in sys.modules:
  matplotlib.use("Agg")  # scripts and tests: files only (Jupyter keeps its inline backend)

from matplotlib import colors  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)
import numpy as np  # noqa: E402

Figure = Any


def _save(fig: Figure, path: str | os.PathLike[str] | None) -> Figure:
  if path is not None:
    os.makedirs(os.path.dirname(os.fspath(path)) or ".", exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
  return fig


def token_labels(text_or_ids: str | bytes | Sequence[int], tokenizer: Any = None
                 ) -> list[str]:
  """Printable labels, one per token: bytes/characters, or ``tokenizer.decode([id])``."""
  if isinstance(text_or_ids, (str, bytes)):
    data = text_or_ids.encode() if isinstance(text_or_ids, str) else text_or_ids
    items = [bytes([b]).decode("latin-1") for b in data]
  else:
    if tokenizer is None:
      return [str(int(i)) for i in text_or_ids]
    items = [tokenizer.decode([int(i)]) for i in text_or_ids]
  visible = {" ": "␣", "\n": "⏎", "\t": "⇥"}
  return [visible.get(t, t if t.isprintable() and t else "·") for t in items]


# --------------------------------------------------------------------------------------
# Attention.
# --------------------------------------------------------------------------------------


def plot_attention_heads(weights: Mapping[str, Any], *, labels: Sequence[str] | None = None,
                         example: int = 0, title: str | None = None,
                         path: str | os.PathLike[str] | None = None) -> Figure:
  """A grid of heat maps: one row per layer, one column per head.

  Args:
    weights: ``{layer name: [B, H, Lq, Lk]}`` (as ``jaxformer.analysis.attention_weights``
      returns) or ``{layer name: [H, Lq, Lk]}``.
    labels: token labels for both axes (self attention), length ``Lk``.
    example: which batch element to draw from ``[B, ...]`` maps.
    title: figure title.
    path: where to write the PNG.
  """
  if not weights:
    raise ValueError("plot_attention_heads: weights is empty")
  maps = {}
  for name, w in weights.items():
    w = np.asarray(w, np.float32)
    if w.ndim == 4:
      w = w[example]
    if w.ndim != 3:
      raise ValueError(f"plot_attention_heads: {name} has shape {w.shape}; expected "
                       "[B, H, Lq, Lk] or [H, Lq, Lk]")
    maps[name] = w
  num_layers = len(maps)
  num_heads = max(w.shape[0] for w in maps.values())
  length = max(w.shape[-1] for w in maps.values())
  cell = max(2.2, min(0.22 * length, 6.0))
  fig, axes = plt.subplots(num_layers, num_heads, squeeze=False,
                           figsize=(cell * num_heads + 0.6, cell * num_layers + 0.6))
  for r, (name, w) in enumerate(maps.items()):
    for h in range(num_heads):
      ax = axes[r, h]
      if h >= w.shape[0]:
        ax.axis("off")
        continue
      # A square-root colour scale: weights near 1 (e.g. the first causal row) do not
      # wash out the rest.
      ax.imshow(w[h], cmap="viridis", interpolation="nearest",
                norm=colors.PowerNorm(0.5, vmin=0.0, vmax=max(float(w[h].max()), 1e-6)))
      ax.set_title(f"{name.replace('/self_attention', '')} · head {h}", fontsize=7)
      if labels is not None and len(labels) == w.shape[-1]:
        ticks = np.arange(w.shape[-1])
        ax.set_xticks(ticks, labels, fontsize=6, fontfamily="monospace")
        ax.set_yticks(np.arange(w.shape[-2]), labels[-w.shape[-2]:], fontsize=6,
                      fontfamily="monospace")
        ax.tick_params(length=0)
      else:
        ax.set_xticks([])
        ax.set_yticks([])
  ax0 = axes[0, 0]
  ax0.set_ylabel("query", fontsize=7)
  axes[-1, 0].set_xlabel("key", fontsize=7)
  if title:
    fig.suptitle(title, fontsize=9)
  fig.tight_layout()
  return _save(fig, path)


def plot_rollout_overlay(images: Any, rollouts: Any, *, titles: Sequence[str] | None = None,
                         alpha: float = 0.5, path: str | os.PathLike[str] | None = None
                         ) -> Figure:
  """Images with their attention rollout upsampled over them (one column per image).

  Args:
    images: ``[N, H, W]`` or ``[N, H, W, C]`` (any range; rescaled for display).
    rollouts: ``[N, gh, gw]`` patch-grid maps, ``H % gh == W % gw == 0``.
    titles: one per image.
    alpha: opacity of the overlay.
    path: where to write the PNG.
  """
  images = np.asarray(images, np.float32)
  rollouts = np.asarray(rollouts, np.float32)
  if images.ndim == 4:
    images = images.mean(-1) if images.shape[-1] != 3 else images
  n = images.shape[0]
  if rollouts.shape[0] != n or rollouts.ndim != 3:
    raise ValueError(f"plot_rollout_overlay: rollouts {rollouts.shape} must be [N, gh, "
                     f"gw] with N = {n} images")
  h, w = images.shape[1:3]
  gh, gw = rollouts.shape[1:]
  if h % gh or w % gw:
    raise ValueError(f"plot_rollout_overlay: image {h}x{w} is not a multiple of the "
                     f"grid {gh}x{gw}")
  fig, axes = plt.subplots(2, n, squeeze=False, figsize=(2.0 * n, 4.2))
  for i in range(n):
    img = images[i]
    img = (img - img.min()) / max(float(img.max() - img.min()), 1e-6)
    up = np.kron(rollouts[i], np.ones((h // gh, w // gw), np.float32))
    axes[0, i].imshow(img, cmap="gray", interpolation="nearest")
    axes[1, i].imshow(img, cmap="gray", interpolation="nearest")
    axes[1, i].imshow(up, cmap="inferno", alpha=alpha, interpolation="nearest")
    for ax in axes[:, i]:
      ax.set_xticks([])
      ax.set_yticks([])
    if titles is not None:
      axes[0, i].set_title(titles[i], fontsize=8)
  axes[0, 0].set_ylabel("image", fontsize=8)
  axes[1, 0].set_ylabel("rollout", fontsize=8)
  fig.tight_layout()
  return _save(fig, path)


def plot_image_maps(maps: Any, *, titles: Sequence[str] | None = None,
                    marks: Sequence[tuple[int, int] | None] | None = None,
                    suptitle: str | None = None,
                    path: str | os.PathLike[str] | None = None) -> Figure:
  """A row of 2-D maps (e.g. axial attention of one pixel), optionally marking a pixel.

  Args:
    maps: ``[N, H, W]``.
    titles: one per map.
    marks: a ``(row, col)`` to circle in each map (the query pixel), or None.
    suptitle: figure title.
    path: where to write the PNG.
  """
  maps = np.asarray(maps, np.float32)
  if maps.ndim != 3:
    raise ValueError(f"plot_image_maps: maps must be [N, H, W], got {maps.shape}")
  n = maps.shape[0]
  fig, axes = plt.subplots(1, n, squeeze=False, figsize=(2.2 * n, 2.4))
  for i in range(n):
    ax = axes[0, i]
    ax.imshow(maps[i], cmap="viridis", interpolation="nearest")
    if marks is not None and marks[i] is not None:
      r, c = marks[i]
      ax.scatter([c], [r], s=60, facecolors="none", edgecolors="red", linewidths=1.5)
    ax.set_xticks([])
    ax.set_yticks([])
    if titles is not None:
      ax.set_title(titles[i], fontsize=8)
  if suptitle:
    fig.suptitle(suptitle, fontsize=9)
  fig.tight_layout()
  return _save(fig, path)


# --------------------------------------------------------------------------------------
# Training curves and tables.
# --------------------------------------------------------------------------------------


def read_metrics(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
  """Rows of a ``metrics.jsonl`` (``path`` is the file or the workdir holding it)."""
  path = os.fspath(path)
  if os.path.isdir(path):
    path = os.path.join(path, "metrics.jsonl")
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


def series(rows: Sequence[Mapping[str, Any]], key: str) -> tuple[np.ndarray, np.ndarray]:
  """``(steps, values)`` of the rows that have ``key``."""
  pts = [(r["step"], r[key]) for r in rows if key in r and r[key] is not None]
  if not pts:
    return np.zeros((0,)), np.zeros((0,))
  steps, values = zip(*pts)
  return np.asarray(steps), np.asarray(values, np.float64)


def _mean_band(runs: Sequence[Sequence[Mapping[str, Any]]], key: str
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """``(steps, mean, std)`` over seeds, on the steps every seed logged."""
  per_seed = [dict(zip(*series(rows, key))) for rows in runs]
  common_steps = sorted(set.intersection(*(set(s) for s in per_seed))) if per_seed else []
  if not common_steps:
    return np.zeros((0,)), np.zeros((0,)), np.zeros((0,))
  values = np.asarray([[s[t] for t in common_steps] for s in per_seed], np.float64)
  std = values.std(0, ddof=1) if len(values) > 1 else np.zeros(len(common_steps))
  return np.asarray(common_steps), values.mean(0), std


def plot_loss_curves(runs: Mapping[str, Any], *,
                     keys: Sequence[str] = ("loss", "eval_loss"),
                     title: str | None = None, log_y: bool = False,
                     path: str | os.PathLike[str] | None = None) -> Figure:
  """Several runs' curves on one plot per key (train loss, eval loss, ...).

  Args:
    runs: ``{label: workdir or metrics.jsonl}``, or ``{label: [one per seed, ...]}``:
      a list is drawn as its mean over seeds with a ±1 std band.
    keys: metrics to plot, one panel each.
    title: figure title.
    log_y: log-scale y axes.
    path: where to write the PNG.
  """
  if not runs:
    raise ValueError("plot_loss_curves: runs is empty")
  data = {label: [read_metrics(q) for q in p] if isinstance(p, (list, tuple))
          else [read_metrics(p)] for label, p in runs.items()}
  fig, axes = plt.subplots(1, len(keys), squeeze=False, figsize=(4.6 * len(keys), 3.4))
  for ax, key in zip(axes[0], keys):
    for label, seeds in data.items():
      steps, mean, std = _mean_band(seeds, key)
      if len(steps):
        n = f" (n={len(seeds)})" if len(seeds) > 1 else ""
        line, = ax.plot(steps, mean, marker="o" if len(steps) <= 3 else None,
                        markersize=3, label=label + n)
        if len(seeds) > 1:
          ax.fill_between(steps, mean - std, mean + std, color=line.get_color(),
                          alpha=0.2, linewidth=0)
    ax.set_xlabel("step")
    ax.set_ylabel(key)
    if log_y:
      ax.set_yscale("log")
    ax.grid(alpha=0.3)
  axes[0, 0].legend(fontsize=7)
  if title:
    fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  return _save(fig, path)


def plot_sweep(xs: Sequence[float], ys: Mapping[str, Sequence[float]], *, xlabel: str,
               ylabel: str, log_x: bool = False, title: str | None = None,
               errors: Mapping[str, Sequence[float]] | None = None,
               path: str | os.PathLike[str] | None = None) -> Figure:
  """One line per series over a swept value (e.g. eval loss against beta).

  ``errors``: ``{series: [std per x]}`` drawn as error bars (e.g. over seeds).
  """
  fig, ax = plt.subplots(figsize=(4.6, 3.4))
  for label, values in ys.items():
    err = (errors or {}).get(label)
    if err is None:
      ax.plot(list(xs), list(values), marker="o", label=label)
    else:
      ax.errorbar(list(xs), list(values), yerr=list(err), marker="o", capsize=3,
                  label=label)
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  if log_x:
    ax.set_xscale("log")
  ax.grid(alpha=0.3)
  if len(ys) > 1:
    ax.legend(fontsize=7)
  if title:
    ax.set_title(title, fontsize=10)
  fig.tight_layout()
  return _save(fig, path)


def plot_bars(values: Mapping[str, float], *, ylabel: str, title: str | None = None,
              errors: Mapping[str, float] | None = None,
              path: str | os.PathLike[str] | None = None) -> Figure:
  """A bar per labelled value (e.g. step time per attention kind); ``errors``: ±std."""
  fig, ax = plt.subplots(figsize=(max(3.0, 1.1 * len(values) + 1.0), 3.2))
  labels = list(values)
  yerr = None if errors is None else [float(errors.get(k, 0.0)) for k in labels]
  ax.bar(np.arange(len(labels)), [float(values[k]) for k in labels], color="tab:blue",
         yerr=yerr, capsize=4)
  ax.set_xticks(np.arange(len(labels)), labels, fontsize=8)
  ax.set_ylabel(ylabel)
  if title:
    ax.set_title(title, fontsize=10)
  ax.grid(alpha=0.3, axis="y")
  fig.tight_layout()
  return _save(fig, path)


def _fmt(value: Any) -> str:
  if value is None:
    return ""
  if isinstance(value, float):
    if math.isnan(value):
      return "nan"
    return f"{value:.4g}" if abs(value) < 1e5 else f"{value:.3e}"
  return str(value)


def _is_std_of(key: str, row: Mapping[str, Any]) -> bool:
  return key.endswith("_std") and key[:-len("_std")] in row


def _cell(row: Mapping[str, Any], column: str) -> str:
  text = _fmt(row.get(column, ""))
  std = row.get(f"{column}_std")
  if isinstance(std, float) and not math.isnan(std) and text:
    text += f" ± {std:.2g}"
  return text


def mean_std_row(per_seed: Sequence[Mapping[str, Any]], keys: Sequence[str],
                 **columns: Any) -> dict[str, Any]:
  """One table row from per-seed rows: ``key`` = mean, ``key_std`` = sample std.

  ``columns`` (labels: run, arm, ...) are copied; ``n`` is the number of seeds. With
  one seed the std is nan (printed as the bare mean). Missing or None values are
  skipped; a key no seed has is left out.
  """
  if not per_seed:
    raise ValueError("mean_std_row: no per-seed rows")
  row: dict[str, Any] = {**columns, "n": len(per_seed)}
  for key in keys:
    values = [float(r[key]) for r in per_seed if r.get(key) is not None]
    if not values:
      continue
    row[key] = float(np.mean(values))
    row[f"{key}_std"] = float(np.std(values, ddof=1)) if len(values) > 1 else math.nan
  return row


def results_table(rows: Sequence[Mapping[str, Any]], *,
                  columns: Sequence[str] | None = None,
                  path: str | os.PathLike[str] | None = None) -> str:
  """A markdown table of ``rows`` (and a CSV beside it when ``path`` ends in ``.md``).

  A column ``c`` whose row also has ``c_std`` (see ``mean_std_row``) prints as
  ``mean ± std``; the CSV keeps both as numbers (``c``, ``c_std``).

  Args:
    rows: one mapping per run; missing values print as empty cells.
    columns: column order (default: keys in first-seen order).
    path: ``*.md`` -> writes the markdown there and ``*.csv`` next to it; ``*.csv`` ->
      the CSV only.
  Returns:
    The markdown text.
  """
  if columns is None:
    columns = []
    for row in rows:
      columns += [k for k in row if k not in columns and not _is_std_of(k, row)]
  lines = ["| " + " | ".join(columns) + " |",
           "|" + "|".join("---" for _ in columns) + "|"]
  for row in rows:
    lines.append("| " + " | ".join(_cell(row, c) for c in columns) + " |")
  csv_columns = []
  for c in columns:
    csv_columns.append(c)
    if any(f"{c}_std" in row for row in rows):
      csv_columns.append(f"{c}_std")
  text = "\n".join(lines) + "\n"
  if path is not None:
    path = os.fspath(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    stem, ext = os.path.splitext(path)
    if ext == ".md":
      with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    with open(stem + ".csv", "w", encoding="utf-8", newline="") as f:
      writer = csv.DictWriter(f, fieldnames=csv_columns, extrasaction="ignore")
      writer.writeheader()
      writer.writerows(rows)
  return text
