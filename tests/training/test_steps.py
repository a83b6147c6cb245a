"""train_step / eval_step: learning, NaN and spike skipping, RNG folding, donation,
exact eval averaging, the causal-LM task."""

from __future__ import annotations

import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxformer.training import optimizer as opt
from jaxformer.training import sharding
from jaxformer.training import state as state_lib
from jaxformer.training import steps
from jaxformer import tasks

import training_helpers as th


def _setup(cfg=None, total_steps=50):
  model = th.TinyLM()
  cfg = cfg or opt.OptimizerConfig(learning_rate=3e-2, warmup_steps=0)
  tx = opt.make_optimizer(cfg, total_steps)
  mesh = sharding.Sharding.build(sharding.ShardingConfig(mesh_shape=(1, 1, 1)),
                                 jax.devices()[:1])
  state, shard = state_lib.create_train_state(th.tiny_init_fn(model), tx,
                                              jax.random.key(0), mesh)
  return model, cfg, tx, mesh, state, shard


def _jnp_batch(seed, **kw):
  return jax.tree.map(jnp.asarray, th.make_batch(seed, **kw))


class TrainStepTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_learns_a_fixed_batch(self):
    model, cfg, tx, _, state, _ = _setup()
    step = self.variant(functools.partial(steps.train_step, model=model,
                                          task=th.tiny_task, tx=tx, opt_config=cfg))
    batch = _jnp_batch(0)
    losses = []
    for _ in range(12):
      state, metrics = step(state, batch)
      losses.append(float(metrics["loss"]))
    self.assertEqual(int(state.step), 12)
    self.assertEqual(int(state.skipped_steps), 0)
    self.assertLess(losses[-1], 0.7 * losses[0])
    # the first step's loss is the loss of the initial parameters (log(32) ~ 3.47)
    self.assertTrue(2.0 < losses[0] < 6.0, losses[0])

  @chex.variants(with_jit=True, without_jit=True)
  def test_nan_loss_is_skipped_and_counted(self):
    model, cfg, tx, _, state, _ = _setup()
    step = self.variant(functools.partial(steps.train_step, model=model,
                                          task=th.tiny_task, tx=tx, opt_config=cfg))
    bad = _jnp_batch(0)
    bad["weights"] = bad["weights"].at[0, 0].set(jnp.nan)
    before = jax.device_get((state.params, state.opt_state))
    state, metrics = step(state, bad)
    self.assertTrue(math.isnan(float(metrics["loss"])))
    self.assertEqual(float(metrics["skipped"]), 1.0)
    self.assertEqual(int(state.skipped_steps), 1)
    self.assertEqual(int(state.step), 1)
    chex.assert_trees_all_equal(jax.device_get((state.params, state.opt_state)),
                                before)
    # a good batch afterwards is applied
    state, metrics = step(state, _jnp_batch(1))
    self.assertEqual(float(metrics["skipped"]), 0.0)
    self.assertEqual(int(state.skipped_steps), 1)
    self.assertFalse(np.array_equal(np.asarray(state.params["out"]["kernel"]),
                                    before[0]["out"]["kernel"]))

  def test_inf_gradient_is_skipped(self):
    model, cfg, tx, _, state, _ = _setup()

    def inf_grad_task(model, params, batch, rng, deterministic):
      loss, metrics = th.tiny_task(model, params, batch, rng, deterministic)
      # finite loss, infinite gradient: d/dx sqrt(x) at 0
      return loss + jnp.sqrt(jnp.abs(params["norm_scale"][0] - 1.0)), metrics

    step = jax.jit(functools.partial(steps.train_step, model=model,
                                     task=inf_grad_task, tx=tx, opt_config=cfg))
    state, metrics = step(state, _jnp_batch(0))
    self.assertTrue(math.isfinite(float(metrics["loss"])))
    self.assertEqual(int(state.skipped_steps), 1)

  def test_loss_spike_is_skipped_until_max_consecutive(self):
    cfg = opt.OptimizerConfig(learning_rate=1e-2, warmup_steps=0, spike_factor=2.0,
                              spike_warmup_steps=0, max_consecutive_spikes=2)
    model, cfg, tx, _, state, _ = _setup(cfg)
    step = jax.jit(functools.partial(steps.train_step, model=model,
                                     task=th.tiny_task, tx=tx, opt_config=cfg))
    # pretend the running mean loss is tiny: every real loss (~3.5) is a spike
    state = state.replace(loss_ema=jnp.float32(0.1))
    skipped = []
    for i in range(4):
      state, metrics = step(state, _jnp_batch(i))
      skipped.append(float(metrics["skipped"]))
    self.assertEqual(skipped, [1.0, 1.0, 0.0, 1.0])
    self.assertEqual(int(state.skipped_steps), 3)

  def test_no_spike_check_by_default(self):
    model, cfg, tx, _, state, _ = _setup()
    state = state.replace(loss_ema=jnp.float32(0.1))
    step = jax.jit(functools.partial(steps.train_step, model=model,
                                     task=th.tiny_task, tx=tx, opt_config=cfg))
    state, metrics = step(state, _jnp_batch(0))
    self.assertEqual(float(metrics["skipped"]), 0.0)
    # the running mean follows accepted losses
    want = 0.99 * 0.1 + 0.01 * float(metrics["loss"])
    self.assertAlmostEqual(float(state.loss_ema), want, places=5)

  def test_step_keys_fold_by_step(self):
    *_, state, _ = _setup()
    k0 = jax.random.key_data(state.step_key())
    k0_again = jax.random.key_data(state.step_key())
    k1 = jax.random.key_data(state.replace(step=state.step + 1).step_key())
    np.testing.assert_array_equal(k0, k0_again)
    self.assertFalse(np.array_equal(k0, k1))

  def test_jitted_step_donates_state_and_logs_learning_rate(self):
    model, cfg, tx, mesh, state, shard = _setup(
        opt.OptimizerConfig(learning_rate=1.0, warmup_steps=4, schedule="constant"))
    step = steps.make_train_step(model=model, task=th.tiny_task, tx=tx,
                                 opt_config=cfg, sharding=mesh,
                                 shardings=shard,
                                 schedule=opt.make_schedule(cfg, 50))
    old_kernel = state.params["out"]["kernel"]
    lrs = []
    for i in range(3):
      state, metrics = step(state, th.make_batch(i))
      lrs.append(float(metrics["learning_rate"]))
    self.assertTrue(old_kernel.is_deleted())
    np.testing.assert_allclose(lrs, [0.0, 0.25, 0.5], atol=1e-7)


class EvalStepTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_averaging_over_batches_is_exact(self):
    model, _, _, _, state, _ = _setup()
    a = th.make_batch(0)
    b = th.make_batch(1)
    b["weights"][:, 5:] = 0.0  # fewer counted tokens in the second batch
    ev = self.variant(functools.partial(steps.eval_step, model=model,
                                        task=th.tiny_task))
    per_batch = [jax.device_get(ev(state.params, x)) for x in (a, b)]
    got = steps.reduce_eval_metrics(per_batch)
    # float64 reference: mean NLL over all counted tokens of both batches
    params = jax.device_get(state.params)
    nll, count = 0.0, 0.0
    for x in (a, b):
      logits = np.asarray(model.apply({"params": params}, x["inputs"]), np.float64)
      logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(
          -1, keepdims=True)) - logits.max(-1, keepdims=True)
      tok = -np.take_along_axis(logp, x["targets"][..., None], -1)[..., 0]
      nll += float((tok * x["weights"]).sum())
      count += float(x["weights"].sum())
    self.assertEqual(got["num_tokens"], count)
    np.testing.assert_allclose(got["loss"], nll / count, rtol=1e-5)

  def test_reduce_needs_batches(self):
    with self.assertRaisesRegex(ValueError, "at least one"):
      steps.reduce_eval_metrics([])


class TasksTest(chex.TestCase):

  def test_registry(self):
    self.assertIs(tasks.task_class("causal_lm"), tasks.CausalLM)
    with self.assertRaisesRegex(ValueError, "known: .*causal_lm"):
      tasks.task_class("mlm_typo")

  def test_causal_lm_task_on_gpt(self):
    from jaxformer.models import gpt  # pylint: disable=g-import-not-at-top
    model = gpt.GPT(gpt.gpt_tiny())
    batch = jax.tree.map(jnp.asarray, th.make_batch(0, batch=2, length=8, vocab=64))
    batch["weights"] = batch["weights"].at[:, 6:].set(0.0)
    params = model.init(jax.random.key(0), batch["inputs"])["params"]
    loss, metrics = tasks.CausalLM({})(model, params, batch, None, True)
    logits = np.asarray(model.apply({"params": params}, batch["inputs"]), np.float64)
    logz = np.log(np.exp(logits).sum(-1))
    tok = logz - np.take_along_axis(logits, np.asarray(batch["targets"])[..., None],
                                    -1)[..., 0]
    w = np.asarray(batch["weights"])
    np.testing.assert_allclose(float(loss), (tok * w).sum() / w.sum(), rtol=1e-5)
    self.assertEqual(float(metrics["num_tokens"]), 12.0)


if __name__ == "__main__":
  pytest.main([__file__])
