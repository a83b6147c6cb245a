"""The main job: a byte-level GPT on the Python standard library's source (no download).

Model size, batch and schedule follow nanoGPT's CPU comparison (shakespeare_char on a
laptop): 4 layers x 128 wide, 4 heads, context 64, batch 12, 2000 steps, AdamW
lr 1e-3 with 100 warmup steps and cosine decay to 1e-4, beta2 0.99, clip 1.0.

Run (rerunning with the same workdir resumes from its last checkpoint)::

  python -m experiments.train --config=experiments/configs/gpt_bytes.py \\
      --workdir=runs/gpt_bytes

On a CPU the host is split into one JAX device per core (``sharding.cpu_devices=-1``)
and the batch is data-parallel over them: the same code as a multi-GPU run, and about
twice as fast on 2 cores as one CPU device (XLA:CPU parallelises this small model's ops
poorly within one device).

Variants: ``--config=experiments/configs/gpt_bytes.py:tiny`` (a few-second smoke run);
overrides such as ``--config.train.num_steps=500 --config.train.log_every=10
--config.train.checkpoint_every=100 --config.train.seed=1
--config.model.num_layers=2 --config.model.block.num_heads=2
--config.sharding.mesh_shape="(1,-1,1)"``.
"""

from __future__ import annotations

from ml_collections import config_dict

from experiments.configs import common


def get_config(arg: str | None = None) -> config_dict.ConfigDict:
  """The config; ``arg="tiny"`` (alias ``"runlocal"``) shrinks it for a smoke test."""
  tiny = common.variant(arg, "gpt_bytes") == "tiny"
  c = config_dict.ConfigDict()
  c.task = "causal_lm"
  c.task_options = common.task_options(
      c.task, sample_prompt="def ", sample_tokens=48, sample_temperature=0.8)
  # nanoGPT's CPU size: 4 x 128, 4 heads, context 64; ByteTokenizer vocabulary (263).
  c.model = common.model("gpt_nano", vocab_size=263, max_len=64)
  c.data = common.data(c.task, source="stdlib_text", tokenizer="bytes", seq_len=64,
                       batch_size=12, eval_batch_size=12, prefetch=2)
  c.optimizer = common.optimizer(warmup_steps=100, b2=0.99)
  c.train = common.train(
      num_steps=2000, log_every=50, eval_every=250,
      eval_batches=20,       # nanoGPT's eval_iters
      checkpoint_every=500)
  # On a CPU: one JAX device per core, the batch data-parallel over them.
  common.finish(c, cpu_devices=-1)

  if tiny:
    common.tiny(c, model=dict(max_len=32, num_layers=2, embed_dim=32),
                block=dict(num_heads=2, mlp_dim=64),
                data=dict(seq_len=32, batch_size=4, eval_batch_size=4),
                task_options=dict(sample_tokens=8), optimizer=dict(warmup_steps=5),
                train=dict(num_steps=20, log_every=5, eval_every=10, eval_batches=2,
                           checkpoint_every=10))
  return c
