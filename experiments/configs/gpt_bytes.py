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
--config.model.num_layers=2 --config.sharding.mesh_shape="(1,-1,1)"``.
"""

from __future__ import annotations

from ml_collections import config_dict

from experiments.configs import common


def get_config(arg: str | None = None) -> config_dict.ConfigDict:
  """The config; ``arg="tiny"`` (alias ``"runlocal"``) shrinks it for a smoke test."""
  variant = (arg or "").strip()
  if variant not in ("", "tiny", "runlocal"):
    raise ValueError(f"gpt_bytes config arg {arg!r} is not one of '', 'tiny', "
                     "'runlocal'")
  c = config_dict.ConfigDict()
  c.task = "causal_lm"

  c.model = config_dict.ConfigDict(dict(
      name="gpt",
      vocab_size=263,        # ByteTokenizer: 256 bytes + 7 specials
      max_len=64,
      num_layers=4,
      embed_dim=128,
      num_heads=4,
      mlp_dim=512,
      positions="learned",
      dropout_rate=0.0,
      attention_dropout_rate=0.0,
      attention_impl=config_dict.placeholder(str),
      attention_scale_multiplier=1.0,  # beta = multiplier / sqrt(head_dim)
      attention_hard=False,            # arg-max attention
      remat=False,
      scan_layers=False,
      dtype="float32",       # bfloat16 on accelerators
      param_dtype="float32",
  ))

  c.data = config_dict.ConfigDict(dict(
      source="stdlib_text",
      tokenizer="bytes",
      train_split="train",
      eval_split="validation",
      seq_len=64,
      batch_size=12,         # global; divided among processes
      eval_batch_size=12,
      pack=True,
      prefetch=2,            # batches produced ahead in a background thread
  ))

  c.optimizer = config_dict.ConfigDict(dict(
      learning_rate=1e-3,
      schedule="cosine",
      warmup_steps=100,
      end_lr_fraction=0.1,
      b1=0.9,
      b2=0.99,
      eps=1e-8,
      weight_decay=0.1,
      grad_clip_norm=1.0,
      grad_accum_steps=1,
      spike_factor=config_dict.placeholder(float),   # e.g. 3.0 to skip loss spikes
      spike_warmup_steps=100,
      max_consecutive_spikes=10,
      loss_ema_decay=0.99,
  ))

  c.train = config_dict.ConfigDict(dict(
      num_steps=2000,
      seed=0,
      log_every=50,
      eval_every=250,
      eval_batches=20,       # nanoGPT's eval_iters
      checkpoint_every=500,
      keep_checkpoints=2,
      async_checkpoint=True,
      progress=config_dict.placeholder(bool),  # None: a bar iff stdout is a TTY
      tensorboard=True,
      sample_prompt="def ",
      sample_tokens=48,      # 0 disables the sample at the end
      sample_temperature=0.8,
  ))

  c.sharding = config_dict.ConfigDict(dict(
      mesh_shape=(-1, 1, 1),  # (data, fsdp, tensor); -1 = the remaining devices
      fsdp=True,              # rules: params' embed axis over "fsdp"
      tensor=True,            # rules: heads / mlp / vocab over "tensor"
      # CPU only: split the host into this many JAX devices (one per core) so the
      # data-parallel mesh above uses every core; -1 = auto (cores dividing the
      # batch), 0 = JAX's default single CPU device. Ignored on accelerators.
      cpu_devices=-1,
  ))

  c.distributed = config_dict.ConfigDict(dict(
      initialize="auto",      # "auto" | "always" | "never"
      coordinator_address=config_dict.placeholder(str),
      num_processes=config_dict.placeholder(int),
      process_id=config_dict.placeholder(int),
  ))

  # A Hugging Face GPT-2 directory to start from (--config.init.pretrained=DIR): its
  # model and BPE tokenizer replace the byte-level ones above.
  c.init = common.init()

  if variant in ("tiny", "runlocal"):
    c.model.update(dict(max_len=32, num_layers=2, embed_dim=32, num_heads=2,
                        mlp_dim=64))
    c.data.update(dict(seq_len=32, batch_size=4, eval_batch_size=4))
    c.optimizer.warmup_steps = 5
    c.train.update(dict(num_steps=20, log_every=5, eval_every=10, eval_batches=2,
                        checkpoint_every=10, sample_tokens=8))
  return c
