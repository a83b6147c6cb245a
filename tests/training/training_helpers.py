"""Shared pieces for the training tests: a tiny LM, its task, batches, tiny configs."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxformer import axes
from jaxformer.training import optimizer as optimizer_lib

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))
VOCAB = 32


def _part(init, names):
  return nn.with_logical_partitioning(init, names)


class TinyLM(nn.Module):
  """Embedding -> MLP -> vocab logits, per position (fast to compile)."""
  vocab: int = VOCAB
  width: int = 16
  hidden: int = 32

  @nn.compact
  def __call__(self, x_BL, segment_ids=None, positions=None, deterministic=True):
    del segment_ids, positions
    table = self.param("embedding", _part(nn.initializers.normal(0.5),
                                          (axes.VOCAB, axes.EMBED)),
                       (self.vocab, self.width))
    h_BLD = nn.with_logical_constraint(
        table[x_BL], (axes.ACT_BATCH, axes.ACT_LENGTH, axes.ACT_EMBED))
    h_BLF = nn.Dense(self.hidden,
                     kernel_init=_part(nn.initializers.lecun_normal(),
                                       (axes.EMBED, axes.MLP)),
                     bias_init=_part(nn.initializers.zeros, (axes.MLP,)),
                     name="hidden")(h_BLD)
    h_BLF = nn.Dropout(0.0)(nn.gelu(h_BLF), deterministic=deterministic)
    scale = self.param("norm_scale", _part(nn.initializers.ones, (axes.MLP,)),
                       (self.hidden,))
    h_BLF = h_BLF * scale[None, None, :]
    return nn.Dense(self.vocab, use_bias=False,
                    kernel_init=_part(nn.initializers.lecun_normal(),
                                      (axes.MLP, axes.VOCAB)),
                    name="out")(h_BLF)


def tiny_task(model, params, batch, rng, deterministic):
  """Weighted next-token cross-entropy (the causal LM task's contract)."""
  rngs = {"dropout": rng} if rng is not None else {}
  logits_BLV = model.apply({"params": params}, batch["inputs"],
                           deterministic=deterministic, rngs=rngs)
  logp_BLV = jax.nn.log_softmax(logits_BLV.astype(jnp.float32))
  nll_BL = -jnp.take_along_axis(logp_BLV, batch["targets"][..., None], -1)[..., 0]
  w_BL = batch["weights"]
  n = w_BL.sum()
  loss = (nll_BL * w_BL).sum() / n
  return loss, {"loss": loss, "num_tokens": n}


def make_batch(seed: int, batch: int = 4, length: int = 8,
               vocab: int = VOCAB) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, vocab, (batch, length + 1))
  return {
      "inputs": tokens[:, :-1].astype(np.int32),
      "targets": tokens[:, 1:].astype(np.int32),
      "weights": np.ones((batch, length), np.float32),
  }


def tiny_init_fn(model: nn.Module, length: int = 8):
  return lambda rng: model.init(rng, jnp.zeros((1, length), jnp.int32))


def tiny_config(**train_overrides: Any):
  """The gpt_bytes tiny variant, quiet (no bar, no TensorBoard, no sample unless
  ``sample_tokens`` is given)."""
  from experiments.configs import gpt_bytes  # pylint: disable=g-import-not-at-top
  c = gpt_bytes.get_config("tiny")
  c.model.update(dict(num_layers=1, embed_dim=16, max_len=16))
  c.model.block.update(dict(num_heads=2, mlp_dim=32))
  c.data.update(dict(seq_len=16, batch_size=4, eval_batch_size=4, prefetch=2))
  c.task_options.sample_tokens = train_overrides.pop("sample_tokens", 0)
  c.train.update(dict(progress=False, tensorboard=False,
                      eval_batches=1, num_steps=6, log_every=1, eval_every=1000,
                      checkpoint_every=1000))
  c.train.update(train_overrides)
  c.sharding.cpu_devices = 0  # tests run in-process after JAX is initialised
  return c


def run_python(code_or_args: list[str], *, env: dict[str, str] | None = None,
               timeout: float = 240, **kwargs) -> subprocess.CompletedProcess:
  """Runs ``python ARGS`` from the repo root with the repo on PYTHONPATH."""
  full_env = dict(os.environ)
  full_env["PYTHONPATH"] = REPO_ROOT + os.pathsep + full_env.get("PYTHONPATH", "")
  full_env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  full_env.update(env or {})
  return subprocess.run([sys.executable, *code_or_args], cwd=REPO_ROOT,
                        env=full_env, capture_output=True, text=True,
                        timeout=timeout, check=False, **kwargs)


def updated_names(origin, params):
  """Top-level names whose one-step updates are nonzero under the origin's tx."""
  base = optimizer_lib.make_optimizer(optimizer_lib.OptimizerConfig(learning_rate=0.1), 10)
  tx = origin.optimizer(base, params)
  grads = jax.tree.map(jnp.ones_like, params)
  opt_state = tx.init(params)
  for _ in range(2):
    updates, opt_state = tx.update(grads, opt_state, params)
  return sorted(name for name, tree in updates.items()
                if any(np.any(np.asarray(x) != 0) for x in jax.tree.leaves(tree)))
