"""GPT-2 small (124M parameters) pretraining, sized for an accelerator.

The architecture is GPT-2 small's (12 x 768, 12 heads, context 1024, vocabulary 50257,
tied embeddings: 124,439,808 parameters). With no tokenizer download available the data
is the embedded standard-library text at the byte level (ids < 263 of the 50257 rows
are used); ``experiments/configs/gpt_text.py`` trains on your own text with a fitted
vocabulary. bfloat16 compute, float32 master
weights; AdamW 6e-4, warmup 700, cosine to 6e-5, beta2 0.95 (nanoGPT's GPT-2 recipe).

Run on one GPU (and, with several devices, e.g. FSDP: ``--config.sharding.mesh_shape
="(1,-1,1)"``)::

  python -m experiments.train --config=experiments/configs/gpt2_small.py \\
      --workdir=runs/gpt2_small

CPU smoke test of the same code path: ``--config=experiments/configs/gpt2_small.py:tiny``.
"""

from __future__ import annotations

from ml_collections import config_dict

from experiments.configs import common
from experiments.configs import gpt_bytes


def get_config(arg: str | None = None) -> config_dict.ConfigDict:
  """The config; ``arg="tiny"`` (alias ``"runlocal"``) shrinks it for a CPU."""
  tiny = common.variant(arg, "gpt2_small") == "tiny"
  c = gpt_bytes.get_config()
  c.model = common.model("gpt2_small", block=dict(
      dropout_rate=0.0, attention_dropout_rate=0.0, dtype="bfloat16"))
  c.task_options.sample_tokens = 256
  c.data.update(dict(seq_len=1024, batch_size=32, eval_batch_size=32, prefetch=4))
  c.optimizer.update(dict(learning_rate=6e-4, warmup_steps=700, b2=0.95))
  c.train.update(dict(num_steps=20000, log_every=100, eval_every=1000,
                      eval_batches=40, checkpoint_every=2000, keep_checkpoints=3))
  if tiny:
    common.tiny(c, model=dict(vocab_size=263, max_len=64, num_layers=2, embed_dim=64),
                block=dict(num_heads=2, mlp_dim=256, dtype="float32"),
                data=dict(seq_len=64, batch_size=4, eval_batch_size=4, prefetch=2),
                task_options=dict(sample_tokens=8), optimizer=dict(warmup_steps=5),
                train=dict(num_steps=20, log_every=5, eval_every=10, eval_batches=2,
                           checkpoint_every=10))
  return c
