"""The NYU deep-learning notes' IMDB sentiment classifier, trained from scratch as written.

The model is the ``nyu_imdb_classifier`` preset: one post-LN encoder layer, d_model 32,
2 heads, feed-forward 128, sinusoidal positions, a vocabulary of 50,002, no bias on
W_q/W_k/W_v and a bias on W_h, and the output ``max over time of Linear(h_t)``
(``pooling="max_of_logits"``). The notes' other poolings are one flag away
(``--config.model.pooling=cls|max|mean|max_of_logits``), as are the other position
encodings (``--config.model.positions=sinusoidal|learned|rotary``).

Two choices differ from the notes, both on purpose: the max over time skips padding
(the notes take it over all positions, padding included; the masked max cannot be moved
by how much a review is padded), and the token embeddings follow the Transformer's
convention that goes with sinusoidal positions (table at stddev d^-½, looked up × √d;
``model.scale_embeddings``, on by default with sinusoids), so the unit-amplitude
sinusoids do not swamp them. Both are defined, and documented, in the preset
(``jaxformer.models.bert.nyu_imdb_classifier``).

Data and vocabulary:

* Real size: IMDB (``imdb_reviews``: train 25k / test 25k, 2 classes), with a
  SentencePiece vocabulary of exactly 50,002 pieces fitted on the train reviews (the
  notes keep the 50,000 most frequent words + 2 specials; a fitted subword vocabulary
  of the same size is the closest analogue that needs no word list), so the model's
  embedding table is the notes' 50,002 x 32. IMDB must be prepared for
  ``tfds.data_source`` (TFDS' default data dir or ``$TFDS_DATA_DIR``); where it is not,
  the run stops at its start with an error that says how to prepare it. It never
  trains on something else unless told to: ``--config.data.source=stdlib_line_kinds
  --config.data.tokenizer=bytes --config.data.eval_split=validation
  --config.model.num_classes=3`` trains the same model on the local set.
* ``:tiny``: the local ``stdlib_line_kinds`` set (lines of the embedded standard
  library labelled comment / definition / code, 3 classes, no download) with the byte
  tokenizer. The model keeps ``vocab_size=50,002`` so it is the notes' model parameter
  for parameter; only the first 259 rows (bytes + specials) are ever looked up.

Every run's first log line names its data source and splits.

Real size (prepared IMDB)::

  python -m experiments.train --config=experiments/configs/nyu_imdb.py \\
      --workdir=runs/nyu_imdb [--config.model.pooling=cls]

Tiny (CPU, a minute, the local set)::

  python -m experiments.train --config=experiments/configs/nyu_imdb.py:tiny \\
      --workdir=runs/nyu_imdb_tiny
"""

from __future__ import annotations

from ml_collections import config_dict

from experiments.configs import common
from jaxformer.data import sources

IMDB = "imdb_reviews"


def imdb_prepared(data_dir: str | None = None) -> bool:
  """Whether ``imdb_reviews`` can be read with ``tfds.data_source`` (no download).

  Informational (the config does not depend on it): a run on unprepared IMDB stops
  with ``sources.tfds_source``'s error, which says how to prepare it."""
  try:
    sources.tfds_source(IMDB, "train", data_dir=data_dir)
  except (ValueError, ImportError):
    return False
  return True


def get_config(arg: str | None = None) -> config_dict.ConfigDict:
  """The config; ``arg="tiny"`` (alias ``"runlocal"``) is the CPU variant."""
  tiny = common.variant(arg, "nyu_imdb") == "tiny"
  imdb = not tiny   # never a silent fallback: unprepared IMDB is an error at run start
  c = config_dict.ConfigDict()
  c.task = "classification"
  c.task_options = common.task_options(c.task)
  c.model = common.model("nyu_imdb_classifier", num_classes=2 if imdb else 3)

  if imdb:
    c.data = common.data(c.task, source=IMDB, tokenizer="sentencepiece",
                         vocab_size=50_002, eval_split="test", seq_len=512,
                         batch_size=64, eval_batch_size=100, prefetch=2)
  else:
    c.data = common.data(c.task, source="stdlib_line_kinds", tokenizer="bytes",
                         seq_len=128, batch_size=64, eval_batch_size=100, prefetch=2)

  c.optimizer = common.optimizer(warmup_steps=200, b2=0.999, weight_decay=0.01)
  c.train = common.train(num_steps=4000, eval_every=500, eval_batches=50)

  if tiny:
    common.tiny(c, data=dict(seq_len=64, batch_size=32, eval_batch_size=64),
                optimizer=dict(learning_rate=3e-3, warmup_steps=10),
                train=dict(num_steps=150, log_every=25, eval_every=50, eval_batches=4,
                           checkpoint_every=150))
  return common.finish(c)
