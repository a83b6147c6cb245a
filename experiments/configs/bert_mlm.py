"""BERT pre-training: masked LM, with or without next-sentence prediction (the ablation).

Data are sentence pairs ``[CLS] A [SEP] B [SEP]`` where B follows A in its document
half of the time (``nsp_pairs`` pipeline); the same pairs feed both arms of the
ablation, only the objective changes: ``task_options.nsp`` adds the NSP head and loss
(``model.nsp_head`` follows it). Masking (15%: 80% [MASK], 10% random, 10% kept) is
drawn inside the train step from the step's key.

Real size (accelerators): BERT-base (12 x 768, 12 heads) over bytes, 512 tokens, on the
``imdb_reviews`` "unsupervised" split (50k reviews, split into sentences), evaluated on
"test"; prepare it once with ``tfds build imdb_reviews --file_format=array_record``::

  python -m experiments.train --config=experiments/configs/bert_mlm.py \\
      --workdir=runs/bert_mlm [--config.task_options.nsp=True] \\
      [--config.data.source_options.data_dir=~/tensorflow_datasets]

Tiny (CPU, a minute or two, no download): 2 x 64 on the embedded standard-library
source, pairs of code blocks::

  python -m experiments.train --config=experiments/configs/bert_mlm.py:tiny \\
      --workdir=runs/bert_mlm_tiny                     # MLM only
  python -m experiments.train --config=experiments/configs/bert_mlm.py:tiny \\
      --workdir=runs/bert_mlm_nsp_tiny --config.task_options.nsp=True

MLM alone on packed text instead of pairs (RoBERTa-style full sequences, and no
pair sampling on the host): ``--config.data.pipeline=lm``.

``experiments/configs/imdb_finetune.py`` fine-tunes the result.
"""

from __future__ import annotations

from ml_collections import config_dict

from experiments.configs import common


def get_config(arg: str | None = None) -> config_dict.ConfigDict:
  """The config; ``arg="tiny"`` (alias ``"runlocal"``) is the CPU variant."""
  tiny = common.variant(arg, "bert_mlm") == "tiny"
  c = config_dict.ConfigDict()
  c.task = "masked_lm"
  c.task_options = common.task_options(c.task)   # nsp=True: + next-sentence prediction

  # bert_base with a byte vocabulary, pre-training heads, bfloat16 compute.
  c.model = common.model("bert_base", vocab_size=263, mlm_head=True,
                         block=dict(dtype="bfloat16"))
  c.model.nsp_head = c.task_options.get_ref("nsp")   # the NSP head follows the task

  c.data = common.data(
      c.task, source="imdb_reviews", tokenizer="bytes", train_split="unsupervised",
      eval_split="test",
      segment_separator=". ",  # sentences
      max_documents=2000,      # documents pairs are drawn from (read at the start)
      max_segments=20, num_pairs=10_000_000, num_eval_pairs=10_000,
      seq_len=512, batch_size=256, eval_batch_size=256, prefetch=2)

  c.optimizer = common.optimizer(learning_rate=1e-4, warmup_steps=10_000,
                                 schedule="linear", end_lr_fraction=0.0,
                                 b2=0.999, weight_decay=0.01)
  c.train = common.train(num_steps=1_000_000, eval_every=10_000,
                         checkpoint_every=10_000)

  if tiny:
    common.tiny(
        c, model=dict(max_len=64, num_layers=2, embed_dim=64),
        block=dict(num_heads=2, mlp_dim=128, dropout_rate=0.0,
                   attention_dropout_rate=0.0, dtype="float32"),
        data=dict(source="stdlib_text", train_split="train", eval_split="validation",
                  segment_separator="\n\n", max_documents=300, max_segments=8,
                  num_pairs=100_000, num_eval_pairs=256, seq_len=64, batch_size=32,
                  eval_batch_size=32),
        optimizer=dict(learning_rate=2e-3, warmup_steps=20, schedule="cosine",
                       end_lr_fraction=0.1),
        train=dict(num_steps=300, log_every=25, eval_every=100, eval_batches=4,
                   checkpoint_every=300))
  return common.finish(c)
