"""Every experiment config: its tiny variant trains end to end (2 steps, shrunk model,
eval and checkpoint included), and its real-size default validates and reads a batch
of its TFDS data under ``tfds.testing.mock_data``.

One end-to-end run per config (compilation dominates the time).
"""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds
from absl import flags
from ml_collections import config_flags

from experiments.configs import axial_shapes
from experiments.configs import bert_mlm
from experiments.configs import common
from experiments.configs import image_gpt_shapes
from experiments.configs import imdb_finetune
from experiments.configs import nyu_imdb
from experiments.configs import transformer_reversal
from experiments.configs import vit_shapes
from flax import traverse_util

from jaxformer import tasks
from jaxformer.data import vocab
from jaxformer.models import registry
from jaxformer.training import config as config_lib
from jaxformer.training import finetune
from jaxformer.training import init as init_lib
from jaxformer.training import loop

CONFIGS = {
    "bert_mlm": bert_mlm,
    "transformer_reversal": transformer_reversal,
    "vit_shapes": vit_shapes,
    "image_gpt_shapes": image_gpt_shapes,
    "axial_shapes": axial_shapes,
    "imdb_finetune": imdb_finetune,
    "nyu_imdb": nyu_imdb,
}

# The smallest model of each kind (overrides of the tiny variant's model section).
B = dict(num_heads=2, mlp_dim=32)
SMALL = {
    "bert_mlm": dict(num_layers=1, embed_dim=16, max_len=16, block=B),
    "transformer_reversal": dict(num_encoder_layers=1, num_decoder_layers=1,
                                 embed_dim=16, block=B),
    "vit_shapes": dict(num_layers=1, embed_dim=16, patch_size=4, block=B),
    "image_gpt_shapes": dict(num_layers=1, embed_dim=16, block=B),
    "axial_shapes": dict(embed_dim=16, block=dict(mlp_dim=32)),
    "imdb_finetune": dict(num_layers=1, embed_dim=16, max_len=16, block=B),
    "nyu_imdb": dict(max_len=16),   # the notes' model is already tiny
}


def quick(name: str, **data):
  """The tiny variant of ``name``, shrunk to a 2-step run with eval and checkpoint."""
  c = CONFIGS[name].get_config("tiny")
  c.model.update(SMALL[name])
  c.data.update(dict(batch_size=4, eval_batch_size=4, prefetch=0, **data))
  if "seq_len" in c.data and "max_len" in SMALL[name]:
    c.data.seq_len = SMALL[name]["max_len"]
  c.train.update(dict(num_steps=2, log_every=1, eval_every=2, eval_batches=1,
                      checkpoint_every=2, progress=False, tensorboard=False,
                      async_checkpoint=False))
  return c


def run(config, workdir):
  summary = loop.train(config, str(workdir))
  rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  assert [r["step"] for r in rows if "loss" in r] == [1, 2]
  assert math.isfinite(summary["loss"]) and math.isfinite(summary["eval_loss"])
  assert summary["step"] == 2 and summary["skipped_steps"] == 0
  assert os.path.isdir(os.path.join(workdir, "checkpoints", "2"))
  return summary


@pytest.fixture(scope="module")
def bert_mlm_run(tmp_path_factory):
  """bert_mlm (with NSP) for 2 steps: ``(workdir, summary)``; imdb_finetune starts
  from its checkpoint."""
  workdir = str(tmp_path_factory.mktemp("bert_mlm"))
  c = quick("bert_mlm", max_documents=20, num_eval_pairs=8)
  c.task_options.nsp = True
  assert c.model.nsp_head  # follows task_options.nsp
  return workdir, run(c, workdir)


def test_bert_mlm_with_nsp(bert_mlm_run):
  _, summary = bert_mlm_run
  assert 0.0 <= summary["eval_nsp_accuracy"] <= 1.0
  assert summary["eval_num_tokens"] > 0  # masked positions


def test_transformer_reversal(tmp_path):
  summary = run(quick("transformer_reversal"), tmp_path)
  assert summary["eval_nll"] != summary["eval_loss"]  # the loss is label-smoothed
  assert summary["eval_num_tokens"] > 4 * 4  # target tokens (>= 4 + EOS per example)
  # BLEU of greedy translations, logged with the eval metrics (seq2seq extra eval)
  rows = [json.loads(line) for line in open(os.path.join(tmp_path, "metrics.jsonl"))]
  bleu = [r["eval_bleu"] for r in rows if "eval_bleu" in r]
  assert len(bleu) == 1 and 0.0 <= bleu[0] <= 100.0
  assert summary["eval_bleu"] == bleu[0]


@pytest.mark.parametrize("name", ["vit_shapes", "image_gpt_shapes", "axial_shapes"])
def test_image_configs(tmp_path, name):
  summary = run(quick(name), tmp_path)
  if name == "vit_shapes":
    assert summary["eval_num_tokens"] == 4  # examples
  else:
    assert summary["eval_num_tokens"] == 4 * 64  # pixels


def test_imdb_finetune_frozen_on_mock_imdb(bert_mlm_run, tmp_path, capsys):
  """From the bert_mlm checkpoint, body frozen: after training, the body is exactly
  the pretrained one (see tests/training/test_finetune.py for step 0). NSP trained the
  pooler, so it stays in the frozen body; the log says what trains."""
  pretrained_dir, _ = bert_mlm_run
  c = quick("imdb_finetune", source="imdb_reviews", eval_split="test")
  c.model.num_classes = 2
  c.finetune.update(dict(pretrained_workdir=pretrained_dir, freeze_body=True))
  with tfds.testing.mock_data(num_examples=8):
    summary = run(c, tmp_path)
  assert 0.0 <= summary["eval_accuracy"] <= 1.0
  pretrained = traverse_util.flatten_dict(
      finetune.load_pretrained_params(pretrained_dir))
  tuned = traverse_util.flatten_dict(finetune.load_pretrained_params(str(tmp_path)))
  origin = config_lib.make_origin(init_lib.InitConfig.parse(c.init, c.finetune))
  assert origin.head(traverse_util.unflatten_dict(tuned)) == ("classifier",)
  count = sum(v.size for k, v in tuned.items() if k[0] == "classifier")
  assert f"| trainable: classifier ({count:,} params)" in capsys.readouterr().out
  body = [k for k in tuned if k[0] != "classifier"]
  assert body and {k[0] for k in body} >= {"encoder", "pooler", "token_embedding"}
  for path in body:
    np.testing.assert_array_equal(tuned[path], pretrained[path], err_msg=str(path))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_real_size_config_reads_its_data(name, monkeypatch):
  """The default (accelerator) config validates, builds its model config and reads a
  batch of its TFDS data (mocked), without compiling anything."""
  c = CONFIGS[name].get_config()
  if name == "nyu_imdb":
    # IMDB with a fitted 50k vocabulary cannot be mocked; the documented explicit
    # override to the local set (test_nyu_imdb_without_imdb_stops covers IMDB).
    c.data.update(dict(source="stdlib_line_kinds", tokenizer="bytes",
                       eval_split="validation", seq_len=128))
    c.data.source_options = {}
    c.model.num_classes = 3
  loop.validate_config(c)
  if name == "bert_mlm":
    c.data.segment_separator = " "  # mock texts are random words, not sentences
  model_cfg, _ = registry.build_model(c.model)
  tokenizer = vocab.build_tokenizer(c.data)
  task = tasks.build_task(c, tokenizer=tokenizer, model_config=model_cfg)
  assert task.example_length() >= 64
  with tfds.testing.mock_data(num_examples=4):
    batch = next(task.batches(batch_size=2, seed=0, train=True))
  lead = {np.shape(v)[0] for v in batch.values()}
  assert lead == {2}
  if c.data.get("seq_len"):
    assert batch["inputs"].shape == (2, c.data.seq_len)
  if "image" in batch:
    size = model_cfg.image_size
    height_width = (size, size) if isinstance(size, int) else tuple(size)
    assert batch["image"].shape == (2, *height_width, 3)


@pytest.mark.parametrize("name", ["nyu_imdb", "imdb_finetune"])
def test_classifier_cli_sets_positions_and_pooling(name):
  """``--config.model.positions`` / ``pooling`` parse from the command line and build."""
  argv = ["prog", f"--config=experiments/configs/{name}.py:tiny",
          "--config.model.positions=sinusoidal", "--config.model.pooling=mean"]
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, flag_values=fv, sys_argv=argv)
  fv(argv)
  model_cfg, _ = registry.build_model(fv.config.model)
  assert (model_cfg.positions, model_cfg.pooling) == ("sinusoidal", "mean")


def test_cli_sets_hard_attention_and_embedding_scale():
  """``attention_hard`` takes a bool or "straight_through" from the command line;
  ``scale_embeddings`` a bool (unset: on exactly with sinusoidal positions)."""
  for text, want in (("straight_through", "straight_through"), ("True", True),
                     ("false", False)):
    argv = ["prog", "--config=experiments/configs/gpt_bytes.py:tiny",
            f"--config.model.block.attention_hard={text}",
            "--config.model.positions=sinusoidal", "--config.model.scale_embeddings=False"]
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, flag_values=fv, sys_argv=argv)
    fv(argv)
    model_cfg, _ = registry.build_model(fv.config.model)
    assert model_cfg.block.attention_hard == want and type(
        model_cfg.block.attention_hard) is type(want)
    assert model_cfg.scale_embeddings is False


@pytest.mark.slow  # ~20 s on 2 cores (compilation)
def test_nyu_imdb_tiny(tmp_path):
  """The notes' classifier on the local labelled set, 2 steps (accuracy of 3 classes)."""
  summary = run(quick("nyu_imdb"), tmp_path)
  assert 0.0 <= summary["eval_accuracy"] <= 1.0


def test_nyu_imdb_without_imdb_stops(tmp_path):
  """Real size never falls back to another data set: on unprepared IMDB the run's
  start (fitting the vocabulary on the train reviews) stops and says how to prepare
  it; every run's header names its data and splits."""
  assert not nyu_imdb.imdb_prepared(data_dir=str(tmp_path / "none"))
  c = nyu_imdb.get_config()
  assert (c.data.source, c.model.num_classes) == ("imdb_reviews", 2)
  c.data.source_options.data_dir = str(tmp_path / "none")
  with pytest.raises(ValueError, match=r"(?s)'imdb_reviews'.*tfds build imdb_reviews"):
    vocab.build_tokenizer(c.data, workdir=str(tmp_path / "run"))
  model_cfg, _ = registry.build_model(c.model)
  task = tasks.build_task(c, tokenizer=None, model_config=model_cfg)
  assert task.describe_data() == (
      f"data 'imdb_reviews' {{'data_dir': {str(tmp_path / 'none')!r}}} "
      "(train split 'train', eval split 'test')")


def test_nyu_imdb_on_imdb_when_prepared():
  with tfds.testing.mock_data(num_examples=2):
    assert nyu_imdb.imdb_prepared()
  c = nyu_imdb.get_config()
  loop.validate_config(c)
  assert (c.data.source, c.data.tokenizer, c.data.vocab_size) == (
      "imdb_reviews", "sentencepiece", 50_002)
  assert (c.model.num_classes, c.model.vocab_size, c.data.eval_split) == (2, 50_002, "test")
  assert nyu_imdb.get_config("tiny").data.source == "stdlib_line_kinds"


def test_nyu_imdb_is_the_notes_model():
  c = nyu_imdb.get_config("tiny")
  model_cfg, _ = registry.build_model(c.model)
  assert (model_cfg.vocab_size, model_cfg.num_layers, model_cfg.embed_dim) == (
      50_002, 1, 32)
  assert (model_cfg.pooling, model_cfg.positions) == ("max_of_logits", "sinusoidal")
  assert c.data.source == "stdlib_line_kinds" and c.model.num_classes == 3


def test_variant_arg_is_checked():
  for module in CONFIGS.values():
    with pytest.raises(ValueError, match="huge"):
      module.get_config("huge")
  assert common.variant("runlocal", "x") == "tiny" and common.variant(None, "x") == ""
