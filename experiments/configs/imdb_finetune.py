"""Fine-tuning a pretrained BERT for text classification (sentiment on IMDB).

Loads the body of a ``bert_mlm.py`` run (every parameter except the new
``classifier`` head, read from the newest checkpoint of
``finetune.pretrained_workdir``), attaches a fresh classifier on the pooled ``[CLS]``
vector, and trains on labelled text; ``--config.finetune.freeze_body=True`` trains the
head only (a linear probe: the body stays bit-identical). BERT's ``pooler`` is only
trained by NSP: after an MLM-only ``bert_mlm`` run (the default) it joins the head,
fresh and trainable, instead of being loaded as a random frozen projection (the log
line says so and lists what trains). The model section is
``bert_mlm``'s (same variant), so the body's shapes match; without
``pretrained_workdir`` the same model trains from scratch (the baseline).

Real size (accelerators): BERT-base from ``runs/bert_mlm`` on ``imdb_reviews``
(train 25k / test 25k, 2 classes), 512 bytes, lr 2e-5, 3 epochs::

  python -m experiments.train --config=experiments/configs/bert_mlm.py \\
      --workdir=runs/bert_mlm
  python -m experiments.train --config=experiments/configs/imdb_finetune.py \\
      --workdir=runs/imdb_finetune --config.finetune.pretrained_workdir=runs/bert_mlm

Tiny (CPU, no download): from a ``bert_mlm.py:tiny`` run, classify lines of the
embedded standard library into 3 kinds (comment / def-or-class / other code; the local
``stdlib_line_kinds`` source)::

  python -m experiments.train --config=experiments/configs/bert_mlm.py:tiny \\
      --workdir=runs/bert_mlm_tiny
  python -m experiments.train --config=experiments/configs/imdb_finetune.py:tiny \\
      --workdir=runs/imdb_finetune_tiny \\
      --config.finetune.pretrained_workdir=runs/bert_mlm_tiny

A Hugging Face BERT or DistilBERT instead (``config.json`` + ``model.safetensors`` +
``vocab.txt``, as ``save_pretrained`` writes them): its model and WordPiece tokenizer
replace the byte-level ones, the classifier starts fresh::

  python -m experiments.train --config=experiments/configs/imdb_finetune.py \\
      --workdir=runs/imdb_bert --config.init.pretrained=path/to/bert-base-uncased

The tiny variant reads ``imdb_reviews`` instead with
``--config.data.source=imdb_reviews --config.model.num_classes=2`` (tests run it under
``tfds.testing.mock_data``).
"""

from __future__ import annotations

from ml_collections import config_dict

from experiments.configs import bert_mlm
from experiments.configs import common


def get_config(arg: str | None = None) -> config_dict.ConfigDict:
  """The config; ``arg="tiny"`` (alias ``"runlocal"``) is the CPU variant."""
  tiny = common.variant(arg, "imdb_finetune") == "tiny"
  pretrained = bert_mlm.get_config(arg)
  c = config_dict.ConfigDict()
  c.task = "classification"
  c.task_options = common.task_options(c.task)

  # The pretrained model's body (same sizes), its pre-training heads off, a classifier.
  c.model = common.model_section({**pretrained.model.to_dict(), "mlm_head": False,
                                  "nsp_head": False, "num_classes": 2})

  # finetune.pretrained_workdir: None trains from scratch; freeze_body=True: only the
  # head (the top-level params initialised fresh) trains.
  c.finetune = common.finetune(head=("classifier",))

  c.data = common.data(c.task, source="imdb_reviews", tokenizer="bytes",
                       eval_split="test", seq_len=512, batch_size=32,
                       eval_batch_size=100, prefetch=2)

  c.optimizer = common.optimizer(learning_rate=2e-5, warmup_steps=250,
                                 schedule="linear", end_lr_fraction=0.0,
                                 b2=0.999, weight_decay=0.01)
  c.train = common.train(num_steps=2400, log_every=50, eval_every=800,
                         eval_batches=250, checkpoint_every=800)

  if tiny:
    common.tiny(c, model=dict(num_classes=3),
                data=dict(source="stdlib_line_kinds", eval_split="validation",
                          seq_len=pretrained.data.seq_len, batch_size=32,
                          eval_batch_size=64),
                optimizer=dict(learning_rate=1e-3, warmup_steps=10, schedule="cosine",
                               end_lr_fraction=0.1),
                train=dict(num_steps=150, log_every=25, eval_every=50, eval_batches=4,
                           checkpoint_every=150))
  return common.finish(c)
