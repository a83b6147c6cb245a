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
  fig, axes = plt.subplots(num_layers, num_heads, squeeze=False, layout="constrained",
                           figsize=(cell * num_heads + 1.4, cell * num_layers + 0.8))
  # One square-root colour scale for every panel (weights near 1, e.g. the first causal
  # row, do not wash out the rest), shown by the colour bar.
  norm = colors.PowerNorm(0.5, vmin=0.0,
                          vmax=max(max(float(w.max()) for w in maps.values()), 1e-6))
  image = None
  for r, (name, w) in enumerate(maps.items()):
    for h in range(num_heads):
      ax = axes[r, h]
      if h >= w.shape[0]:
        ax.axis("off")
        continue
      image = ax.imshow(w[h], cmap="viridis", interpolation="nearest", norm=norm)
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
  if image is not None:
    fig.colorbar(image, ax=axes, shrink=0.6, label="attention weight (√ scale)")
  if title:
    fig.suptitle(title, fontsize=9)
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
  fig, axes = plt.subplots(2, n, squeeze=False, figsize=(2.0 * n + 1.0, 4.2),
                           layout="constrained")
  norm = colors.Normalize(0.0, max(float(rollouts.max()), 1e-6))
  overlay = None
  for i in range(n):
    img = images[i]
    img = (img - img.min()) / max(float(img.max() - img.min()), 1e-6)
    up = np.kron(rollouts[i], np.ones((h // gh, w // gw), np.float32))
    axes[0, i].imshow(img, cmap="gray", interpolation="nearest")
    axes[1, i].imshow(img, cmap="gray", interpolation="nearest")
    overlay = axes[1, i].imshow(up, cmap="inferno", alpha=alpha, interpolation="nearest",
                                norm=norm)
    for ax in axes[:, i]:
      ax.set_xticks([])
      ax.set_yticks([])
    if titles is not None:
      axes[0, i].set_title(titles[i], fontsize=8)
  axes[0, 0].set_ylabel("image", fontsize=8)
  axes[1, 0].set_ylabel("rollout", fontsize=8)
  fig.colorbar(overlay, ax=axes[1, :], shrink=0.8, label="rollout weight")
  return _save(fig, path)


def plot_image_maps(maps: Any, *, titles: Sequence[str] | None = None,
                    marks: Sequence[tuple[int, int] | None] | None = None,
                    suptitle: str | None = None, colorbar_label: str = "attention weight",
                    image: Any = None, image_title: str = "image",
                    path: str | os.PathLike[str] | None = None) -> Figure:
  """A row of 2-D maps (e.g. axial attention of one pixel) on one colour scale (with its
  colour bar), optionally after the image they belong to and marking a pixel.

  Args:
    maps: ``[N, H, W]``.
    titles: one per map.
    marks: a ``(row, col)`` to circle in each map (the query pixel), or None.
    suptitle: figure title.
    colorbar_label: what the colours measure.
    image: an ``[H, W]`` image drawn first, in grey and outside the colour scale (its
      pixels are not what the colour bar measures); marked with ``marks[0]``.
    image_title: its title.
    path: where to write the PNG.
  """
  maps = np.asarray(maps, np.float32)
  if maps.ndim != 3:
    raise ValueError(f"plot_image_maps: maps must be [N, H, W], got {maps.shape}")
  n = maps.shape[0]
  extra = int(image is not None)
  fig, axes = plt.subplots(1, n + extra, squeeze=False,
                           figsize=(2.2 * (n + extra) + 1.0, 2.6), layout="constrained")
  norm = colors.Normalize(min(float(maps.min()), 0.0), max(float(maps.max()), 1e-6))
  drawn = None
  panels = ([(np.asarray(image, np.float32), image_title, "gray", None)] if extra else [])
  panels += [(maps[i], None if titles is None else titles[i], "viridis", norm)
             for i in range(n)]
  for k, (values, title, cmap, panel_norm) in enumerate(panels):
    ax = axes[0, k]
    shown = ax.imshow(values, cmap=cmap, interpolation="nearest", norm=panel_norm)
    if panel_norm is not None:
      drawn = shown
    mark = None if marks is None else marks[max(k - extra, 0)]
    if mark is not None:
      r, c = mark
      ax.scatter([c], [r], s=60, facecolors="none", edgecolors="red", linewidths=1.5)
    ax.set_xticks([])
    ax.set_yticks([])
    if title is not None:
      ax.set_title(title, fontsize=8)
  fig.colorbar(drawn, ax=axes[0, extra:], shrink=0.8, label=colorbar_label)
  if suptitle:
    fig.suptitle(suptitle, fontsize=9)
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


def _axis_label(key: str, units: Mapping[str, str] | str | None) -> str:
  """``key (unit)``: ``units`` maps keys to units (or is one unit for every key); by
  default losses and NLLs are in nats, accuracies are fractions."""
  unit = units.get(key) if isinstance(units, Mapping) else units
  if unit is None:
    if "loss" in key or "nll" in key:
      unit = "nats"
    elif "accuracy" in key:
      unit = "fraction"
  return f"{key} ({unit})" if unit else key


def plot_loss_curves(runs: Mapping[str, Any], *,
                     keys: Sequence[str] = ("loss", "eval_loss"),
                     title: str | None = None, log_y: bool = False,
                     units: Mapping[str, str] | str | None = None,
                     path: str | os.PathLike[str] | None = None) -> Figure:
  """Several runs' curves on one plot per key (train loss, eval loss, ...).

  Args:
    runs: ``{label: workdir or metrics.jsonl}``, or ``{label: [one per seed, ...]}``:
      a list is drawn as its mean over seeds with a ±1 std band.
    keys: metrics to plot, one panel each.
    title: figure title.
    log_y: log-scale y axes.
    units: the y axes' units: ``{key: unit}`` or one for all (default: nats for
      losses, e.g. "nats per token" for a language model's).
    path: where to write the PNG.
  """
  if not runs:
    raise ValueError("plot_loss_curves: runs is empty")
  data = {label: [read_metrics(q) for q in p] if isinstance(p, (list, tuple))
          else [read_metrics(p)] for label, p in runs.items()}
  fig, axes = plt.subplots(1, len(keys), squeeze=False, figsize=(4.6 * len(keys), 3.6),
                           layout="constrained")
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
    ax.set_ylabel(_axis_label(key, units))
    if log_y:
      ax.set_yscale("log")
    else:
      ax.ticklabel_format(axis="y", useOffset=False)
    ax.grid(alpha=0.3)
  axes[0, 0].legend(fontsize=7)
  if title:
    fig.suptitle(title, fontsize=10)
  return _save(fig, path)


def plot_sweep(xs: Sequence[float], ys: Mapping[str, Sequence[float]], *, xlabel: str,
               ylabel: str, log_x: bool = False, title: str | None = None,
               errors: Mapping[str, Sequence[float]] | None = None,
               points: Mapping[str, tuple[float, float]] | None = None,
               path: str | os.PathLike[str] | None = None) -> Figure:
  """One line per series over a swept value (e.g. eval loss against beta).

  ``errors``: ``{series: [std per x]}`` drawn as error bars (e.g. over seeds).
  ``points``: ``{label: (value, std)}`` of arms that have no swept value (e.g. hard
  attention beside a β sweep): drawn as separate points in a panel of their own, on the
  same y axis, never as a line across the sweep.
  """
  if points:
    fig, (ax, ax_points) = plt.subplots(
        1, 2, figsize=(4.6 + 0.8 * len(points) + 0.8, 3.6), sharey=True,
        layout="constrained", gridspec_kw={"width_ratios": [4.6, 0.8 * len(points) + 0.8]})
    names = list(points)
    ax_points.errorbar(np.arange(len(names)), [points[k][0] for k in names],
                       yerr=[points[k][1] for k in names], fmt="s", color="tab:red",
                       capsize=3)
    ax_points.set_xticks(np.arange(len(names)), names, fontsize=7, rotation=20)
    ax_points.set_xlim(-0.6, len(names) - 0.4)
    ax_points.grid(alpha=0.3)
  else:
    fig, ax = plt.subplots(figsize=(4.6, 3.6), layout="constrained")
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
    fig.suptitle(title, fontsize=10)
  return _save(fig, path)


def plot_bars(values: Mapping[str, float], *, ylabel: str, title: str | None = None,
              errors: Mapping[str, float] | None = None,
              path: str | os.PathLike[str] | None = None) -> Figure:
  """A bar per labelled value (e.g. step time per attention kind); ``errors``: ±std."""
  fig, ax = plt.subplots(figsize=(max(3.0, 1.1 * len(values) + 1.0), 3.4),
                         layout="constrained")
  labels = list(values)
  yerr = None if errors is None else [float(errors.get(k, 0.0)) for k in labels]
  ax.bar(np.arange(len(labels)), [float(values[k]) for k in labels], color="tab:blue",
         yerr=yerr, capsize=4)
  ax.set_xticks(np.arange(len(labels)), labels, fontsize=8)
  ax.set_ylabel(ylabel)
  if title:
    ax.set_title(title, fontsize=10)
  ax.grid(alpha=0.3, axis="y")
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
  return ((key.endswith("_std") and key[:-len("_std")] in row)
          or (key.endswith("_sig") and key[:-len("_sig")] in row))


def _cell(row: Mapping[str, Any], column: str) -> str:
  text = _fmt(row.get(column, ""))
  std = row.get(f"{column}_std")
  if isinstance(std, float) and not math.isnan(std) and text:
    text += f" ± {std:.2g}"
  if row.get(f"{column}_sig") and text:
    text += " *"
  return text


# --------------------------------------------------------------------------------------
# The one rule for "a difference" (experiments/notebooks/README.md).
# --------------------------------------------------------------------------------------

SIGNIFICANCE_LEVEL = 0.05
# Columns holding per-seed paired differences (arm minus reference, same seed).
PAIRED_PREFIXES = ("d_", "delta_")


def paired_test(differences: Sequence[float]) -> dict[str, float | bool]:
  """The notebooks' rule for a difference: a two-sided paired t-test at 5 %.

  ``differences``: one arm minus its reference, one value per seed (paired: the two
  runs of a seed share its initialisation and data order). A difference is claimed
  (``significant``) when ``p < 0.05``, i.e. ``|mean| > t_{0.975, n-1} * std / sqrt(n)``
  with the sample std; with n = 3 seeds that is ``|mean| > 2.48 * std`` (t > 4.30).
  Fewer than 2 values, or all equal to zero, are never significant.

  Returns:
    ``{"n", "mean", "std", "t", "p", "significant"}`` (std, t and p nan when n < 2).
  """
  from scipy import stats  # pylint: disable=g-import-not-at-top

  values = np.asarray([float(x) for x in differences], np.float64)
  n = len(values)
  if n == 0:
    raise ValueError("paired_test: no differences")
  mean = float(values.mean())
  if n < 2:
    return dict(n=n, mean=mean, std=math.nan, t=math.nan, p=math.nan,
                significant=False)
  std = float(values.std(ddof=1))
  if std == 0.0:
    t = math.inf if mean else 0.0
    p = 0.0 if mean else 1.0
  else:
    t = mean / (std / math.sqrt(n))
    p = float(2.0 * stats.t.sf(abs(t), df=n - 1))
  return dict(n=n, mean=mean, std=std, t=float(t), p=p,
              significant=bool(p < SIGNIFICANCE_LEVEL))


def paired_threshold(n: int) -> float:
  """``k`` such that the rule claims a difference iff ``|mean| > k * std`` (n seeds)."""
  from scipy import stats  # pylint: disable=g-import-not-at-top
  if n < 2:
    raise ValueError(f"paired_threshold: n={n}; needs n >= 2")
  return float(stats.t.ppf(1.0 - SIGNIFICANCE_LEVEL / 2.0, df=n - 1) / math.sqrt(n))


def mean_std_row(per_seed: Sequence[Mapping[str, Any]], keys: Sequence[str],
                 **columns: Any) -> dict[str, Any]:
  """One table row from per-seed rows: ``key`` = mean, ``key_std`` = sample std.

  ``columns`` (labels: run, arm, ...) are copied; ``n`` is the number of seeds. With
  one seed the std is nan (printed as the bare mean). Missing or None values are
  skipped; a key no seed has is left out. A key that holds paired differences
  (``d_*``, ``delta_*``) also gets ``key_sig``: :func:`paired_test`'s verdict, which
  :func:`results_table` prints as a ``*`` after the value.
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
    if key.startswith(PAIRED_PREFIXES):
      row[f"{key}_sig"] = paired_test(values)["significant"]
  return row


def results_table(rows: Sequence[Mapping[str, Any]], *,
                  columns: Sequence[str] | None = None,
                  path: str | os.PathLike[str] | None = None) -> str:
  """A markdown table of ``rows`` (and a CSV beside it when ``path`` ends in ``.md``).

  A column ``c`` whose row also has ``c_std`` (see ``mean_std_row``) prints as
  ``mean ± std``, followed by `` *`` where ``c_sig`` is true (a paired difference that
  passes :func:`paired_test`); the CSV keeps them as columns (``c``, ``c_std``,
  ``c_sig``).

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
    for suffix in ("_std", "_sig"):
      if any(f"{c}{suffix}" in row for row in rows):
        csv_columns.append(f"{c}{suffix}")
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
