"""Sequence to sequence: an encoder-decoder Transformer, teacher forcing, label smoothing.

Tiny (CPU, about a minute, no download): reverse random strings over ``a..j`` (the
synthetic ``reversal`` source, 4-12 characters), bytes in and out::

  python -m experiments.train --config=experiments/configs/transformer_reversal.py:tiny \\
      --workdir=runs/reversal_tiny

Real size (accelerators): ``transformer_base`` (6 + 6 layers x 512, 8 heads, FFN 2048,
post-LN, sinusoidal positions, tied embeddings, dropout 0.1, label smoothing 0.1, Adam
b2=0.98 with the paper's rsqrt schedule and 4000 warmup steps) on
``wmt14_translate/de-en`` (German -> English), byte-level, 256 bytes a side; prepare it
once with ``tfds build wmt14_translate/de-en --file_format=array_record``::

  python -m experiments.train --config=experiments/configs/transformer_reversal.py \\
      --workdir=runs/transformer_wmt14 \\
      [--config.data.source_options.data_dir=~/tensorflow_datasets]

Eval reports teacher-forced token ``accuracy`` and ``nll`` on the held-out split, and
``eval_bleu``: corpus BLEU (sacrebleu) of greedy translations of the first
``task_options.bleu_batches`` eval batches (0 turns it off; see
``jaxformer/tasks/seq2seq.py``), word-level (``13a``) for WMT, character-level
for the reversal strings (which have no spaces).
"""

from __future__ import annotations

from ml_collections import config_dict

from experiments.configs import common


def get_config(arg: str | None = None) -> config_dict.ConfigDict:
  """The config; ``arg="tiny"`` (alias ``"runlocal"``) is the CPU variant."""
  tiny = common.variant(arg, "transformer_reversal") == "tiny"
  c = config_dict.ConfigDict()
  c.task = "seq2seq"
  c.task_options = common.task_options(
      c.task,
      bleu_batches=4,        # greedy decoding of 4 x 128 eval pairs (0: no BLEU)
      bleu_tokenize="13a")

  # transformer_base with a byte vocabulary and bfloat16 compute.
  c.model = common.model("transformer_base", vocab_size=263,
                         block=dict(dtype="bfloat16"))

  c.data = common.data(c.task, source="wmt14_translate/de-en", tokenizer="bytes",
                       source_key="de", target_key="en", source_len=256,
                       target_len=256, batch_size=128, eval_batch_size=128, prefetch=2)

  c.optimizer = common.optimizer(learning_rate=7e-4, schedule="rsqrt",
                                 warmup_steps=4000, b2=0.98, eps=1e-9,
                                 weight_decay=0.0, grad_clip_norm=0.0)
  c.train = common.train(num_steps=100_000, eval_every=5000, checkpoint_every=5000)

  if tiny:
    common.tiny(c, model=dict(max_len=16, num_encoder_layers=2, num_decoder_layers=2,
                              embed_dim=64),
                block=dict(num_heads=4, mlp_dim=128, norm="pre", dropout_rate=0.0,
                           dtype="float32"),
                data=dict(source="reversal", source_key="source", target_key="target",
                          source_len=16, target_len=16, batch_size=32,
                          eval_batch_size=32),
                task_options=dict(bleu_tokenize="char"),  # one "word" per string
                optimizer=dict(learning_rate=2e-3, schedule="cosine", warmup_steps=30,
                               end_lr_fraction=0.1, grad_clip_norm=1.0),
                train=dict(num_steps=400, log_every=50, eval_every=100, eval_batches=4,
                           checkpoint_every=400))
  return common.finish(c)
