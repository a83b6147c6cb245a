"""experiments/plotting.py: figures are written, tables and metrics read back exactly."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from experiments import plotting

PNG = b"\x89PNG\r\n\x1a\n"


def _write_metrics(workdir, losses, eval_losses):
  workdir.mkdir(parents=True, exist_ok=True)
  with open(workdir / "metrics.jsonl", "w", encoding="utf-8") as f:
    for step, loss in losses.items():
      f.write(json.dumps({"step": step, "loss": loss}) + "\n")
    for step, loss in eval_losses.items():
      f.write(json.dumps({"step": step, "eval_loss": loss}) + "\n")


def test_read_metrics_and_series(tmp_path):
  _write_metrics(tmp_path / "a", {10: 3.0, 20: 2.5}, {20: 2.7})
  rows = plotting.read_metrics(tmp_path / "a")
  assert rows == plotting.read_metrics(tmp_path / "a" / "metrics.jsonl")
  steps, values = plotting.series(rows, "loss")
  np.testing.assert_array_equal(steps, [10, 20])
  np.testing.assert_allclose(values, [3.0, 2.5])
  steps, values = plotting.series(rows, "eval_loss")
  np.testing.assert_array_equal(steps, [20])
  assert plotting.series(rows, "missing")[0].size == 0


def test_plot_loss_curves_draws_each_run(tmp_path):
  _write_metrics(tmp_path / "a", {10: 3.0, 20: 2.5}, {20: 2.7})
  _write_metrics(tmp_path / "b", {10: 3.1, 20: 2.4}, {20: 2.6})
  fig = plotting.plot_loss_curves({"a": tmp_path / "a", "b": tmp_path / "b"},
                                  path=tmp_path / "out" / "curves.png")
  assert (tmp_path / "out" / "curves.png").read_bytes()[:8] == PNG
  train_ax, eval_ax = fig.axes[:2]
  assert [line.get_label() for line in train_ax.lines] == ["a", "b"]
  np.testing.assert_allclose(train_ax.lines[1].get_ydata(), [3.1, 2.4])
  np.testing.assert_allclose(eval_ax.lines[0].get_ydata(), [2.7])
  # Units on the loss axes; no offset on a linear axis (a near-constant curve reads as
  # its values, not as "1e-5 + 2.4284").
  assert train_ax.get_ylabel() == "loss (nats)" and eval_ax.get_ylabel() == "eval_loss (nats)"
  assert not train_ax.yaxis.get_major_formatter().get_useOffset()
  fig = plotting.plot_loss_curves({"a": tmp_path / "a"}, keys=("loss",),
                                  units="nats per byte")
  assert fig.axes[0].get_ylabel() == "loss (nats per byte)"
  with pytest.raises(ValueError, match="empty"):
    plotting.plot_loss_curves({})


def test_results_table_markdown_and_csv(tmp_path):
  rows = [{"run": "a", "loss": 1.23456, "n": 3},
          {"run": "b", "loss": 2.0, "n": None, "extra": "x"}]
  text = plotting.results_table(rows, path=tmp_path / "t.md")
  assert text.splitlines() == ["| run | loss | n | extra |", "|---|---|---|---|",
                               "| a | 1.235 | 3 |  |", "| b | 2 |  | x |"]
  assert (tmp_path / "t.md").read_text(encoding="utf-8") == text
  with open(tmp_path / "t.csv", encoding="utf-8", newline="") as f:
    back = list(csv.DictReader(f))
  assert back[0]["loss"] == "1.23456" and back[1]["extra"] == "x"
  only = plotting.results_table(rows, columns=["run"], path=tmp_path / "u.csv")
  assert only.splitlines()[2] == "| a |"
  assert not (tmp_path / "u.md").exists() and (tmp_path / "u.csv").exists()


def test_plot_attention_heads_grid(tmp_path):
  w = np.random.default_rng(0).random((1, 3, 4, 4))
  fig = plotting.plot_attention_heads({"layers_0": w, "layers_1": w[0, :2]},
                                      labels=list("abcd"), path=tmp_path / "h.png")
  assert (tmp_path / "h.png").read_bytes()[:8] == PNG
  assert len(fig.axes) == 7               # 2 x 3 heads + one colour bar for all
  assert not fig.axes[5].axison          # layer 1 has two heads: third cell empty
  assert fig.axes[6].get_ylabel() == "attention weight (√ scale)"
  assert fig.axes[0].images[0].norm is fig.axes[1].images[0].norm   # one scale
  np.testing.assert_allclose(fig.axes[1].images[0].get_array(), w[0, 1])
  assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == list("abcd")
  with pytest.raises(ValueError, match="expected"):
    plotting.plot_attention_heads({"x": np.ones((4, 4))})


def test_plot_rollout_overlay_upsamples_the_grid(tmp_path):
  images = np.random.default_rng(0).random((2, 8, 8, 1))
  grid = np.arange(8.0).reshape(2, 2, 2)
  fig = plotting.plot_rollout_overlay(images, grid, titles=["x", "y"],
                                      path=tmp_path / "r.png")
  assert (tmp_path / "r.png").read_bytes()[:8] == PNG
  overlay = fig.axes[3].images[1].get_array()   # second image's overlay
  assert overlay.shape == (8, 8)
  np.testing.assert_allclose(overlay[:4, 4:], 5.0)
  assert fig.axes[-1].get_ylabel() == "rollout weight"        # its colour bar
  with pytest.raises(ValueError, match="multiple"):
    plotting.plot_rollout_overlay(images, np.ones((2, 3, 3)))


def test_loss_curves_over_seeds_draw_mean_and_band(tmp_path):
  for seed, offset in ((0, 0.0), (1, 1.0)):
    _write_metrics(tmp_path / f"s{seed}", {1: 3.0 + offset, 2: 2.0 + offset}, {})
  fig = plotting.plot_loss_curves({"arm": [tmp_path / "s0", tmp_path / "s1"]},
                                  keys=("loss",))
  np.testing.assert_allclose(fig.axes[0].lines[0].get_ydata(), [3.5, 2.5])
  assert len(fig.axes[0].collections) == 1   # the ±1 std band
  assert fig.axes[0].get_legend().get_texts()[0].get_text() == "arm (n=2)"


def test_plot_image_maps_sweep_and_bars(tmp_path):
  fig = plotting.plot_image_maps(np.ones((2, 3, 3)), titles=["a", "b"],
                                 marks=[(1, 2), None], path=tmp_path / "m.png")
  assert len(fig.axes) == 3 and len(fig.axes[0].collections) == 1   # + the colour bar
  assert fig.axes[2].get_ylabel() == "attention weight"
  # An image before the maps: grey, outside the maps' colour scale.
  maps = np.stack([np.full((3, 3), 0.2), np.full((3, 3), 0.6)])
  fig = plotting.plot_image_maps(maps, image=np.full((3, 3), 200.0), marks=[(0, 0)] * 2)
  assert [ax.get_title() for ax in fig.axes[:3]] == ["image", "", ""]
  assert fig.axes[1].images[0].norm is fig.axes[2].images[0].norm
  assert fig.axes[1].images[0].norm.vmax == pytest.approx(0.6)
  assert len(fig.axes[0].collections) == 1        # the image is marked too
  # Arms without a swept value: points in a panel of their own, no line across x.
  fig = plotting.plot_sweep([0.1, 1.0], {"soft": [3.0, 2.0]}, xlabel="b", ylabel="y",
                            points={"hard": (2.5, 0.1), "st": (2.2, 0.05)})
  assert len(fig.axes) == 2 and len(fig.axes[0].lines) == 1
  assert [t.get_text() for t in fig.axes[1].get_xticklabels()] == ["hard", "st"]
  fig = plotting.plot_sweep([1, 2, 4], {"s": [3.0, 2.0, 1.0]}, xlabel="x", ylabel="y",
                            log_x=True, path=tmp_path / "s.png")
  np.testing.assert_allclose(fig.axes[0].lines[0].get_ydata(), [3.0, 2.0, 1.0])
  fig = plotting.plot_sweep([1, 2], {"s": [3.0, 2.0]}, errors={"s": [0.5, 0.1]},
                            xlabel="x", ylabel="y")
  segments = fig.axes[0].collections[0].get_segments()   # the error bars
  np.testing.assert_allclose([seg[:, 1] for seg in segments], [[2.5, 3.5], [1.9, 2.1]])
  fig = plotting.plot_bars({"a": 1.0, "b": 2.5}, ylabel="ms", path=tmp_path / "b.png")
  assert [p.get_height() for p in fig.axes[0].patches] == [1.0, 2.5]
  fig = plotting.plot_bars({"a": 1.0}, ylabel="ms", errors={"a": 0.25})
  assert len(fig.axes[0].lines) >= 1   # the error bar's caps
  for name in ("m.png", "s.png", "b.png"):
    assert (tmp_path / name).read_bytes()[:8] == PNG


def test_token_labels():
  assert plotting.token_labels("a b\n") == ["a", "␣", "b", "⏎"]
  assert plotting.token_labels([5, 6]) == ["5", "6"]


class _Tok:
  def decode(self, ids):
    return {1: "x", 2: "\t"}[ids[0]]


def test_token_labels_with_a_tokenizer():
  assert plotting.token_labels([1, 2], _Tok()) == ["x", "⇥"]
