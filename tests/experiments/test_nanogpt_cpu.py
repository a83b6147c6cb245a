"""Tests of experiments/benchmarks/nanogpt_cpu.py and nanogpt_torch.py (nanoGPT vs.
jaxformer on the CPU).

The helpers without torch run everywhere; everything that needs torch is skipped
(``pytest.importorskip``) where torch is not installed: it is not a project dependency.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from experiments.benchmarks import nanogpt_cpu as nb
from experiments.benchmarks import nanogpt_torch as nt


def _tiny_config():
  """The tiny gpt_bytes variant with nanoGPT's 4x MLP (32 wide -> 128)."""
  config = nb.load_config("experiments/configs/gpt_bytes.py:tiny")
  with config.unlocked():
    config.model.block.mlp_dim = 4 * config.model.embed_dim
  return config


# --- no torch needed ------------------------------------------------------------------


def test_nanogpt_lr_matches_nanogpt_get_lr():
  kw = dict(learning_rate=1e-3, min_lr=1e-4, warmup_steps=100, decay_steps=2000)
  assert nt.nanogpt_lr(0, **kw) == pytest.approx(1e-3 / 101)
  assert nt.nanogpt_lr(99, **kw) == pytest.approx(1e-3 * 100 / 101)
  assert nt.nanogpt_lr(100, **kw) == pytest.approx(1e-3)
  assert nt.nanogpt_lr(1050, **kw) == pytest.approx(0.5 * (1e-3 + 1e-4))
  assert nt.nanogpt_lr(2000, **kw) == pytest.approx(1e-4)
  assert nt.nanogpt_lr(2500, **kw) == pytest.approx(1e-4)
  lrs = [nt.nanogpt_lr(i, **kw) for i in range(100, 2001)]
  assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_train_settings_follow_the_config():
  config = nb.load_config()
  s = nt.TrainSettings.from_config(config, steps=7)
  assert (s.steps, s.learning_rate, s.warmup_steps, s.b2, s.grad_clip) == (
      7, 1e-3, 100, 0.99, 1.0)
  assert s.min_lr == pytest.approx(1e-4)
  assert s.eval_every == config.train.eval_every
  with pytest.raises(ValueError, match="attention"):
    nt.TrainSettings(attention="flash")
  with pytest.raises(ValueError, match="steps"):
    nt.TrainSettings(steps=0)


def test_model_section_mapping_and_rejections():
  config = nb.load_config()
  cfg = nt.NanoGPTConfig.from_model_section(config.model)
  assert (cfg.vocab_size, cfg.block_size, cfg.n_layer, cfg.n_head, cfg.n_embd,
          cfg.bias) == (263, 64, 4, 4, 128, True)
  with pytest.raises(ValueError, match="mlp_dim"):
    nt.NanoGPTConfig.from_model_section(nb.load_config(
        "experiments/configs/gpt_bytes.py:tiny").model)   # 2x MLP: not nanoGPT
  rotary = dict(config.model, positions="rotary")
  with pytest.raises(ValueError, match="positions"):
    nt.NanoGPTConfig.from_model_section(rotary)
  with pytest.raises(ValueError, match="n_head"):
    nt.NanoGPTConfig(n_embd=130, n_head=4)


def test_window_means_and_timing_summary():
  ms = [100.0] * 3 + [10.0] * 6 + [30.0] * 3 + [12.0] * 3
  assert nb.window_means(ms, 3) == [100.0, 10.0, 10.0, 30.0, 12.0]
  summary = nb.timing_summary(nb.window_means(ms, 3), tokens_per_step=768)
  assert summary["ms_per_step"] == pytest.approx(11.0)  # median of 10, 10, 30, 12
  assert summary["tokens_per_sec"] == pytest.approx(768 * 1000 / 11.0)
  assert summary["windows"] == 4
  with pytest.raises(ValueError, match="window"):
    nb.window_means(ms, 0)


def test_summarize_ours_reads_metrics_rows():
  rows = [{"step": 10, "loss": 5.0, "step_time_ms": 50.0},
          {"step": 20, "loss": 4.0, "step_time_ms": 30.0},
          {"step": 20, "eval_loss": 4.2, "eval_accuracy": 0.3},
          {"step": 30, "loss": 3.5, "step_time_ms": 20.0},
          {"step": 40, "loss": 3.0, "step_time_ms": 40.0},
          {"step": 40, "eval_loss": 3.1}]
  summary = {"step": 40, "num_params": 123, "step_time_ms": 33.0, "loss": 3.0,
             "wall_time_s": 2.0}
  out = nb.summarize_ours(rows, summary, tokens_per_step=100)
  assert out["ms_per_step"] == pytest.approx(30.0)  # first window dropped
  assert out["final_eval_loss"] == pytest.approx(3.1)
  assert out["evals"] == [{"step": 20, "eval_loss": 4.2},
                          {"step": 40, "eval_loss": 3.1}]
  assert (out["num_params"], out["final_train_loss"], out["ms_per_step_mean"]) == (
      123, 3.0, 33.0)


def test_verdict_and_markdown_report():
  torch_row = {"ms_per_step": 32.0, "final_eval_loss": 1.90, "num_params": 10,
               "evals": [{"step": 250, "eval_loss": 2.5}]}
  ours_row = {"ms_per_step": 24.0, "final_eval_loss": 1.95, "num_params": 10,
              "evals": [{"step": 250, "eval_loss": 2.4}]}
  v = nb.verdict(torch_row, ours_row, speed_tolerance=0.05, loss_tolerance=0.02)
  assert v["speed_ratio"] == pytest.approx(0.75) and v["no_slower"]
  assert v["loss_delta"] == pytest.approx(0.05) and not v["no_worse"]
  assert nb.verdict(None, ours_row, speed_tolerance=0.0, loss_tolerance=0.0)[
      "no_slower"] is None
  results = {"sides": {"torch": torch_row, "ours": ours_row}, "verdict": v,
             "settings": dict(steps=2000, batch_size=12, seq_len=64,
                              tokens_per_step=768, data="d", eval_batches=20,
                              eval_every=250, torch_attention="causal", log_every=10,
                              threads=2),
             "system": dict(date_utc="2026", cpu="cpu", nproc=2,
                            load_avg_1_5_15=[0.0, 0.0, 0.0], python="3.11",
                            torch="2", jax="0.10", flax="0.12"),
             "notes": ["a note"], "command": "python -m x"}
  md = nb.markdown_report(results)
  assert "| ms/step (median of 10-step windows) | 32.00 | 24.00 | 0.750 |" in md
  assert "learns no worse (eval loss Δ <= 0.02): **NO**" in md
  assert "| 250 | 2.5000 | 2.4000 |" in md


def test_ours_command_and_args():
  cmd = nb.ours_command("experiments/configs/gpt_bytes.py", "/w", steps=50,
                        log_every=10, eval_every=25, eval_batches=20,
                        extra=["--config.model.block.attention_impl=xla"])
  assert cmd[1:3] == ["-m", "experiments.train"]
  for flag in ("--config.train.num_steps=50", "--config.train.eval_every=25",
               "--config.train.eval_batches=20", "--config.train.checkpoint_every=50",
               "--workdir=/w", "--config.model.block.attention_impl=xla"):
    assert flag in cmd
  args = nb.parse_args(["--steps", "5", "--sides", "ours"])
  assert args.sides == ("ours",) and args.steps == 5
  with pytest.raises(SystemExit):
    nb.parse_args(["--sides", "tf"])
  with pytest.raises(SystemExit):
    nb.parse_args(["--steps", "0"])


def test_data_iterators_are_ours():
  config = _tiny_config()
  with config.unlocked():
    config.train.eval_batches = 2
  train_it, evals = nb.data_iterators(config)
  first = next(train_it)
  train_it.close()
  again, evals_again = nb.data_iterators(config)
  np.testing.assert_array_equal(next(again)["inputs"], first["inputs"])
  again.close()
  assert len(evals) == 2 and first["inputs"].shape == (4, 32)
  np.testing.assert_array_equal(evals[1]["targets"], evals_again[1]["targets"])
  np.testing.assert_array_equal(first["inputs"][:, 1:], first["targets"][:, :-1])


# --- torch ----------------------------------------------------------------------------


def test_param_count_equals_ours():
  pytest.importorskip("torch")
  for config in (nb.load_config(), _tiny_config()):
    model = nt.NanoGPT(nt.NanoGPTConfig.from_model_section(config.model))
    assert model.num_params() == nb.ours_param_count(config)
  assert nb.ours_param_count(nb.load_config()) == 835_200


def test_init_is_nanogpts():
  torch = pytest.importorskip("torch")
  torch.manual_seed(0)
  model = nt.NanoGPT(nt.NanoGPTConfig())
  assert model.transformer.wte.weight is model.lm_head.weight
  cproj = model.transformer.h[0].attn.c_proj.weight
  assert float(cproj.detach().std()) == pytest.approx(0.02 / math.sqrt(8), rel=0.1)
  assert float(model.transformer.h[0].mlp.c_fc.weight.detach().std()) == pytest.approx(
      0.02, rel=0.1)
  assert float(model.transformer.h[0].mlp.c_fc.bias.detach().abs().max()) == 0.0


def _packed_batch():
  """[2, 32] rows: row 0 holds two documents (split at 10), row 1 one."""
  rng = np.random.default_rng(0)
  inputs = rng.integers(0, 263, size=(2, 32)).astype(np.int32)
  segment_ids = np.ones((2, 32), np.int32)
  segment_ids[0, 10:] = 2
  positions = np.tile(np.arange(32, dtype=np.int32), (2, 1))
  positions[0, 10:] -= 10
  return {"inputs": inputs, "targets": np.roll(inputs, -1, axis=1),
          "segment_ids": segment_ids, "positions": positions,
          "weights": np.ones((2, 32), np.float32)}


def test_same_function_as_our_gpt_given_the_same_params():
  """With our weights (and tanh GELU) the torch model computes our GPT's logits;
  'segments' mode matches ours on packed rows, 'causal' (nanoGPT) only without
  document boundaries."""
  torch = pytest.importorskip("torch")
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from flax import linen as nn  # pylint: disable=g-import-not-at-top
  from jaxformer.models import registry  # pylint: disable=g-import-not-at-top
  config = _tiny_config()
  _, model = registry.build_model(config.model)
  # Any weights will do (and skip compiling init): random ones of our GPT's shapes.
  shapes = nn.unbox(jax.eval_shape(model.init, jax.random.key(1),
                                   jnp.zeros((1, 32), jnp.int32))["params"])
  rng = np.random.default_rng(2)
  params = jax.tree.map(
      lambda s: jnp.asarray(rng.normal(0.0, 0.2, s.shape), jnp.float32), shapes)
  torch_model = nt.NanoGPT(nt.NanoGPTConfig.from_model_section(config.model,
                                                               gelu="tanh"))
  nt.load_jax_params(torch_model, params)
  batch = _packed_batch()
  apply = jax.jit(model.apply)
  ours_packed = np.asarray(apply(
      {"params": params}, jnp.asarray(batch["inputs"]),
      segment_ids=jnp.asarray(batch["segment_ids"]),
      positions=jnp.asarray(batch["positions"])))
  ours_plain = np.asarray(apply({"params": params}, jnp.asarray(batch["inputs"])))
  with torch.no_grad():
    tb = nt.to_torch_batch(batch, "segments")
    theirs_packed = torch_model(tb["inputs"], tb["positions"], tb["attn_mask"]).numpy()
    tb = nt.to_torch_batch(batch, "causal")
    theirs_plain = torch_model(tb["inputs"], tb["positions"], tb["attn_mask"]).numpy()
  np.testing.assert_allclose(theirs_packed, ours_packed, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(theirs_plain, ours_plain, atol=1e-5, rtol=1e-5)
  # Row 1 has no boundary: nanoGPT's causal mode equals ours there, not on row 0.
  np.testing.assert_allclose(theirs_plain[1], ours_packed[1], atol=1e-5, rtol=1e-5)
  assert np.abs(theirs_plain[0, 10:] - ours_packed[0, 10:]).max() > 1e-3


def test_weighted_loss_matches_ours():
  torch = pytest.importorskip("torch")
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from jaxformer.objectives import causal_lm  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(2, 5, 7)).astype(np.float32)
  targets = rng.integers(0, 7, size=(2, 5)).astype(np.int32)
  weights = np.array([[1, 1, 1, 0, 0], [1, 0, 1, 1, 1]], np.float32)
  ours, _ = causal_lm.loss(jnp.asarray(logits), jnp.asarray(targets),
                           jnp.asarray(weights))
  theirs = nt.weighted_loss(torch.from_numpy(logits),
                            torch.from_numpy(targets.astype(np.int64)),
                            torch.from_numpy(weights))
  assert float(theirs) == pytest.approx(float(ours), rel=1e-5)
  zero = nt.weighted_loss(torch.from_numpy(logits),
                          torch.from_numpy(targets.astype(np.int64)),
                          torch.zeros(2, 5))
  assert float(zero) == 0.0


def test_torch_trainer_smoke_and_learning():
  pytest.importorskip("torch")
  config = _tiny_config()
  with config.unlocked():
    config.train.eval_batches = 2
  model_cfg = nt.NanoGPTConfig.from_model_section(config.model)
  train_it, evals = nb.data_iterators(config)
  try:
    settings = nt.TrainSettings.from_config(config, steps=3, eval_every=2, threads=1,
                                            log_every=1)
    result = nt.train_torch(model_cfg, settings, train_it, evals, log=None)
  finally:
    train_it.close()
  assert len(result["step_ms"]) == 3 and all(t > 0 for t in result["step_ms"])
  assert all(math.isfinite(x) for x in result["losses"])
  assert [e["step"] for e in result["evals"]] == [2, 3]
  assert all(math.isfinite(e["eval_loss"]) for e in result["evals"])
  # Learning: one repeated batch, no warmup -> the loss falls.
  batch = evals[0]
  settings = nt.TrainSettings(steps=8, learning_rate=1e-2, min_lr=1e-2,
                              warmup_steps=0, eval_every=8, threads=1)
  result = nt.train_torch(model_cfg, settings, iter([batch] * 8), [batch], log=None)
  assert result["losses"][-1] < result["losses"][0] - 0.5
  assert result["evals"][-1]["eval_loss"] < result["losses"][0] - 0.5


def test_main_torch_side_writes_results(tmp_path):
  pytest.importorskip("torch")
  results = nb.main(["--sides", "torch", "--steps", "2", "--eval_every", "2",
                     "--eval_batches", "1", "--log_every", "1", "--threads", "1",
                     "--out", str(tmp_path)])
  row = results["sides"]["torch"]
  assert row["num_params"] == 835_200 and row["steps"] == 2
  assert math.isfinite(row["final_eval_loss"]) and row["ms_per_step"] > 0
  written = sorted(p.name for p in tmp_path.iterdir())
  assert len(written) == 2 and written[0].startswith("nanogpt_cpu-")
  saved = json.loads((tmp_path / written[0]).read_text())
  assert saved["sides"]["torch"]["num_params"] == 835_200
  assert "PyTorch nanoGPT" in (tmp_path / written[1]).read_text()


def test_main_without_torch_skips_that_side(tmp_path, monkeypatch):
  monkeypatch.setattr(nb, "torch", None)
  monkeypatch.setattr(nb, "ours_available", lambda: "not yet")
  results = nb.main(["--steps", "2", "--out", str(tmp_path)])
  assert results["sides"] == {}
  assert "torch is not installed" in results["errors"]["torch"]
  assert "not yet" in results["errors"]["ours"]
  assert len(list(tmp_path.iterdir())) == 2


@pytest.mark.slow
def test_main_ours_side_runs_experiments_train(tmp_path):
  """Our trainer in a subprocess (tiny config, 4 steps), read back from its files."""
  results = nb.main(["--sides", "ours", "--config",
                     "experiments/configs/gpt_bytes.py:tiny", "--steps", "4",
                     "--eval_every", "2", "--eval_batches", "1", "--log_every", "1",
                     "--out", str(tmp_path / "out"),
                     "--ours_workdir", str(tmp_path / "work")])
  assert "ours" not in results["errors"], results["errors"]
  row = results["sides"]["ours"]
  assert row["num_params"] == nb.ours_param_count(
      nb.load_config("experiments/configs/gpt_bytes.py:tiny"))
  assert [e["step"] for e in row["evals"]] == [2, 4]
  assert math.isfinite(row["final_eval_loss"]) and row["ms_per_step"] > 0
