"""Optimizer: schedules, weight-decay mask, clipped AdamW vs a float64 reference, and
gradient accumulation == one large batch."""

from __future__ import annotations

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

from jaxformer.training import optimizer as opt
from jaxformer.training import sharding
from jaxformer.training import state as state_lib
from jaxformer.training import steps

import training_helpers as th


def _ref_lr(name, step, *, peak, warmup, total, end_frac):
  """Float64 reference of make_schedule."""
  if warmup and step < warmup:
    return peak * step / warmup
  t = step - warmup
  decay = max(total - warmup, 1)
  if name == "cosine":
    frac = min(t, decay) / decay
    return peak * (end_frac + (1 - end_frac) * 0.5 * (1 + math.cos(math.pi * frac)))
  if name == "linear":
    frac = min(t, decay) / decay
    return peak + (peak * end_frac - peak) * frac
  if name == "rsqrt":
    off = max(warmup, 1)
    return peak * math.sqrt(off / (t + off))
  return peak


class ScheduleTest(parameterized.TestCase):

  @parameterized.parameters("cosine", "linear", "rsqrt", "constant")
  def test_matches_reference(self, name):
    cfg = opt.OptimizerConfig(learning_rate=2e-3, schedule=name, warmup_steps=10,
                              end_lr_fraction=0.1)
    fn = opt.make_schedule(cfg, total_steps=110)
    for step in (0, 1, 5, 10, 11, 40, 60, 109, 110, 200):
      want = _ref_lr(name, step, peak=2e-3, warmup=10, total=110, end_frac=0.1)
      np.testing.assert_allclose(float(fn(step)), want, rtol=1e-5, atol=1e-9,
                                 err_msg=f"{name} at step {step}")

  def test_no_warmup_starts_at_peak(self):
    cfg = opt.OptimizerConfig(learning_rate=1e-3, warmup_steps=0)
    self.assertAlmostEqual(float(opt.make_schedule(cfg, 100)(0)), 1e-3, places=9)

  @parameterized.parameters(
      dict(field="schedule", value="exp"),
      dict(field="learning_rate", value=0.0),
      dict(field="warmup_steps", value=-1),
      dict(field="grad_accum_steps", value=0),
      dict(field="spike_factor", value=0.5),
      dict(field="end_lr_fraction", value=2.0),
  )
  def test_bad_config_names_field(self, field, value):
    with self.assertRaisesRegex(ValueError, field):
      opt.OptimizerConfig(**{field: value})

  def test_from_mapping_rejects_unknown(self):
    with self.assertRaisesRegex(ValueError, "learnin_rate"):
      opt.OptimizerConfig.from_mapping({"learnin_rate": 1e-3})
    cfg = opt.OptimizerConfig.from_mapping({"learning_rate": 3e-4,
                                            "no_decay": [r"bias$"]})
    self.assertEqual(cfg.no_decay, (r"bias$",))


def _gpt_like_params():
  return {
      "token_embedding": {"embedding": np.ones((6, 4), np.float32)},
      "decoder": {
          "layers_0": {
              "ln_1": {"scale": np.ones(4, np.float32),
                       "bias": np.zeros(4, np.float32)},
              "mlp": {"kernel": np.ones((4, 8), np.float32),
                      "bias": np.ones(8, np.float32)},
          },
          "final_norm": {"scale": np.ones(4, np.float32)},
      },
      "lm_head": {"kernel": np.ones((4, 6), np.float32)},
  }


class DecayMaskTest(parameterized.TestCase):

  def test_default_mask(self):
    mask = opt.decay_mask(_gpt_like_params())
    self.assertEqual(mask, {
        "token_embedding": {"embedding": False},
        "decoder": {
            "layers_0": {"ln_1": {"scale": False, "bias": False},
                         "mlp": {"kernel": True, "bias": False}},
            "final_norm": {"scale": False},
        },
        "lm_head": {"kernel": True},
    })

  def test_embeddings_can_be_decayed(self):
    no_decay = tuple(p for p in opt.DEFAULT_NO_DECAY if "embedding" not in p)
    mask = opt.decay_mask(_gpt_like_params(), no_decay)
    self.assertTrue(mask["token_embedding"]["embedding"])
    self.assertFalse(mask["decoder"]["layers_0"]["mlp"]["bias"])

  def test_decay_reaches_only_masked_params(self):
    # Zero gradients: Adam's step is 0, so only weight decay moves parameters.
    cfg = opt.OptimizerConfig(learning_rate=0.1, schedule="constant", warmup_steps=0,
                              weight_decay=0.5, grad_clip_norm=None)
    tx = opt.make_optimizer(cfg, total_steps=10)
    params = jax.tree.map(jnp.asarray, _gpt_like_params())
    updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params),
                           params)
    new = jax.tree.map(lambda p, u: p + u, params, updates)
    mask = opt.decay_mask(params)
    for (path, p), n, m in zip(jax.tree_util.tree_flatten_with_path(params)[0],
                               jax.tree.leaves(new), jax.tree.leaves(mask)):
      want = np.asarray(p) * (1 - 0.1 * 0.5) if m else np.asarray(p)
      np.testing.assert_allclose(np.asarray(n), want, rtol=1e-6, err_msg=str(path))


def _ref_adamw(params, grads_seq, *, lr_fn, b1, b2, eps, wd, clip, mask):
  """Float64 clipped AdamW (optax conventions: eps outside the sqrt, bias-corrected)."""
  p = {k: np.asarray(v, np.float64) for k, v in params.items()}
  m = {k: np.zeros_like(v) for k, v in p.items()}
  v = {k: np.zeros_like(x) for k, x in p.items()}
  for t, grads in enumerate(grads_seq, start=1):
    g = {k: np.asarray(x, np.float64) for k, x in grads.items()}
    norm = math.sqrt(sum(float((x**2).sum()) for x in g.values()))
    if clip and norm > clip:
      g = {k: x * clip / norm for k, x in g.items()}
    lr = lr_fn(t - 1)
    for k in p:
      m[k] = b1 * m[k] + (1 - b1) * g[k]
      v[k] = b2 * v[k] + (1 - b2) * g[k]**2
      mhat = m[k] / (1 - b1**t)
      vhat = v[k] / (1 - b2**t)
      upd = mhat / (np.sqrt(vhat) + eps) + (wd * p[k] if mask[k] else 0.0)
      p[k] = p[k] - lr * upd
  return p


class AdamWReferenceTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_matches_float64_reference(self):
    cfg = opt.OptimizerConfig(learning_rate=0.05, schedule="cosine", warmup_steps=2,
                              end_lr_fraction=0.1, b1=0.9, b2=0.95, eps=1e-8,
                              weight_decay=0.1, grad_clip_norm=1.0)
    tx = opt.make_optimizer(cfg, total_steps=6)
    rng = np.random.default_rng(0)
    params = {"kernel": rng.normal(size=(3, 4)).astype(np.float32),
              "bias": rng.normal(size=(4,)).astype(np.float32)}
    # large, then small gradients: clipping changes the second moment history
    grads_seq = [{k: (rng.normal(size=v.shape) * s).astype(np.float32)
                  for k, v in params.items()} for s in (50.0, 0.01, 1.0, 3.0)]

    @self.variant
    def step(p, s, g):
      u, s = tx.update(g, s, p)
      return jax.tree.map(lambda a, b: a + b, p, u), s

    p = jax.tree.map(jnp.asarray, params)
    s = tx.init(p)
    for g in grads_seq:
      p, s = step(p, s, g)
    lr_fn = lambda t: _ref_lr("cosine", t, peak=0.05, warmup=2, total=6,
                              end_frac=0.1)
    want = _ref_adamw(params, grads_seq, lr_fn=lr_fn, b1=0.9, b2=0.95, eps=1e-8,
                      wd=0.1, clip=1.0, mask={"kernel": True, "bias": False})
    for k in params:
      np.testing.assert_allclose(np.asarray(p[k]), want[k], rtol=2e-5, atol=2e-6)


class GradAccumulationTest(chex.TestCase):

  def test_two_micro_batches_equal_one_large_batch(self):
    model = th.TinyLM()
    mesh = sharding.Sharding.build(sharding.ShardingConfig(mesh_shape=(1, 1, 1)),
                                   jax.devices()[:1])
    big = th.make_batch(0, batch=8)
    halves = [{k: v[:4] for k, v in big.items()}, {k: v[4:] for k, v in big.items()}]
    results = {}
    for k in (1, 2):
      cfg = opt.OptimizerConfig(learning_rate=1e-2, warmup_steps=0,
                                grad_accum_steps=k)
      tx = opt.make_optimizer(cfg, total_steps=10 * k)
      state, shard = state_lib.create_train_state(
          th.tiny_init_fn(model), tx, jax.random.key(0), mesh)
      init_params = jax.device_get(state.params)
      step = steps.make_train_step(model=model, task=th.tiny_task, tx=tx,
                                   opt_config=cfg, sharding=mesh,
                                   shardings=shard)
      if k == 1:
        state, _ = step(state, big)
      else:
        state, _ = step(state, halves[0])
        # the first micro-step only accumulates
        chex.assert_trees_all_equal(jax.device_get(state.params), init_params)
        state, _ = step(state, halves[1])
      results[k] = jax.device_get(state.params)
    # the parameters moved, and identically (up to float32 summation order)
    self.assertGreater(
        float(np.abs(results[1]["out"]["kernel"] - init_params["out"]["kernel"]).max()),
        1e-3)
    chex.assert_trees_all_close(results[1], results[2], rtol=1e-5, atol=1e-6)


if __name__ == "__main__":
  pytest.main([__file__])
