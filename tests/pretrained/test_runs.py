"""init.pretrained in training runs, and the sample / perplexity commands, on the fixtures."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

import helpers as h
from experiments import perplexity as perplexity_cli
from experiments import sample as sample_cli
from experiments.configs import gpt_bytes, imdb_finetune
from jaxformer.models import registry
from jaxformer.pretrained import from_huggingface, runs
from jaxformer.training import optimizer as opt_lib
from jaxformer.training import sharding as sharding_lib
from jaxformer.training import state as state_lib

REPO_ROOT = os.path.dirname(os.path.dirname(h.HERE))


@pytest.fixture(scope="module")
def gpt2():
  return from_huggingface(h.fixture("gpt2_lm"))


def _run(args: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
  env = dict(os.environ)
  env["PYTHONPATH"] = REPO_ROOT + os.pathsep + env.get("PYTHONPATH", "")
  return subprocess.run([sys.executable, *args], cwd=REPO_ROOT, env=env,
                        capture_output=True, text=True, timeout=timeout, check=False)


def test_configure_takes_the_checkpoints_model_and_tokenizer():
  config = gpt_bytes.get_config("tiny")
  assert runs.configure(config) is config  # init.pretrained unset: unchanged
  with config.unlocked():
    config.init.pretrained = h.fixture("gpt2_lm")
  new = runs.configure(config)
  hf = h.hf_config("gpt2_lm")
  assert new.model.vocab_size == hf["vocab_size"] and new.model.max_len == 64
  assert new.model.block.num_heads == 2 and new.model.block.norm_eps == 1e-5
  assert new.model.remat == config.model.remat       # the run's own choices stay
  assert new.data.tokenizer == "pretrained" and config.data.tokenizer == "bytes"
  assert runs.tokenizer(new).vocab_size == hf["vocab_size"]
  with config.unlocked():
    config.init.pretrained = h.fixture("bert_model")
  with pytest.raises(ValueError, match="model.name='gpt' cannot take a bert checkpoint"):
    runs.configure(config)


def test_load_into_state_body_and_matching_heads():
  config = imdb_finetune.get_config("tiny")
  with config.unlocked():
    config.init.pretrained = h.fixture("bert_pretraining")
  config = runs.configure(config)
  cfg, model = registry.build_model(
      {**config.model.to_dict(), "block": dict(config.model.block)})
  assert cfg.num_classes == 3 and not cfg.mlm_head
  mesh = sharding_lib.make_mesh((1, 1, 1), jax.devices()[:1])
  tx = opt_lib.make_optimizer(opt_lib.OptimizerConfig(), 10)
  init_fn = lambda r: model.init(r, jnp.zeros((1, 8), jnp.int32))  # noqa: E731
  state, shardings = state_lib.create_train_state(init_fn, tx, jax.random.key(0), mesh,
                                                  sharding_lib.make_rules())
  loaded = runs.load_into_state(state, shardings.params, config)
  hf = load_file(os.path.join(h.fixture("bert_pretraining"), "model.safetensors"))
  np.testing.assert_array_equal(loaded.params["pooler"]["kernel"],
                                hf["bert.pooler.dense.weight"].T)
  np.testing.assert_array_equal(loaded.params["token_embedding"]["embedding"],
                                hf["bert.embeddings.word_embeddings.weight"])
  np.testing.assert_array_equal(loaded.params["classifier"]["kernel"],
                                state.params["classifier"]["kernel"])   # fresh head
  assert loaded.params["encoder"]["layers_0"]["mlp"]["wi"]["kernel"].sharding == (
      shardings.params["encoder"]["layers_0"]["mlp"]["wi"]["kernel"])


def test_sample_greedy_equals_full_forward(gpt2):
  model, params = gpt2
  text = sample_cli.sample(h.fixture("gpt2_lm"), "Hello world", max_new_tokens=6,
                           temperature=0.0, model_and_params=gpt2)
  tok = runs.tokenizers.load_tokenizer(h.fixture("gpt2_lm"))
  ids = tok.encode("Hello world")
  for _ in range(6):   # greedy without the cache
    logits = model.apply({"params": params}, jnp.asarray([ids], jnp.int32))
    ids.append(int(jnp.argmax(logits[0, -1])))
    if ids[-1] == tok.eos_id:
      break
  assert text == "Hello world" + tok.decode(ids[len(tok.encode("Hello world")):])


def test_perplexity_is_the_mean_nll(gpt2):
  model, params = gpt2
  text = "The quick brown fox jumps over the lazy dog."
  ids = runs.tokenizers.load_tokenizer(h.fixture("gpt2_lm")).encode(text)
  ppl, count = perplexity_cli.perplexity(h.fixture("gpt2_lm"), text, window=len(ids),
                                         model_and_params=gpt2)
  logp = jax.nn.log_softmax(model.apply({"params": params}, jnp.asarray([ids]))[0])
  want = -np.mean([float(logp[i, ids[i + 1]]) for i in range(len(ids) - 1)])
  assert count == len(ids) - 1
  np.testing.assert_allclose(math.log(ppl), want, rtol=1e-5)
  ppl2, count2 = perplexity_cli.perplexity(h.fixture("gpt2_lm"), text, window=4,
                                           model_and_params=gpt2)
  assert count2 == len(ids) - math.ceil(len(ids) / 4) and ppl2 > 1
  with pytest.raises(ValueError, match="window=1 must lie in"):
    perplexity_cli.perplexity(h.fixture("gpt2_lm"), text, window=1, model_and_params=gpt2)


@pytest.mark.slow
def test_cli_finetunes_bert_fixture_and_samples_gpt2_fixture(tmp_path):
  """Fine-tunes the tiny BERT fixture 2 steps through experiments.train, trains the
  tiny GPT-2 fixture 2 steps as a causal LM, and prompts it through
  experiments.sample."""
  workdir = str(tmp_path / "ft")
  proc = _run(["-m", "experiments.train",
               "--config=experiments/configs/imdb_finetune.py:tiny",
               f"--workdir={workdir}",
               f"--config.init.pretrained={h.fixture('bert_pretraining')}",
               "--config.train.num_steps=2", "--config.train.log_every=1",
               "--config.train.eval_every=2", "--config.train.eval_batches=1",
               "--config.train.checkpoint_every=2"])
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(os.path.join(workdir, "summary.json"), encoding="utf-8") as f:
    summary = json.load(f)
  assert summary["step"] == 2 and np.isfinite(summary["eval_loss"])
  from jaxformer.training import finetune  # pylint: disable=g-import-not-at-top
  params = finetune.load_pretrained_params(workdir)
  hf = load_file(os.path.join(h.fixture("bert_pretraining"), "model.safetensors"))
  # two AdamW steps at lr 1e-3 move a weight by at most ~2e-3 from the checkpoint
  diff = np.abs(params["encoder"]["layers_1"]["mlp"]["wo"]["kernel"]
                - hf["bert.encoder.layer.1.output.dense.weight"].T).max()
  assert diff < 5e-3
  assert params["classifier"]["kernel"].shape == (32, 3)

  lm_dir = str(tmp_path / "lm")
  proc = _run(["-m", "experiments.train", "--config=experiments/configs/gpt_bytes.py:tiny",
               f"--workdir={lm_dir}", f"--config.init.pretrained={h.fixture('gpt2_lm')}",
               "--config.train.num_steps=2", "--config.train.log_every=1",
               "--config.train.eval_every=2", "--config.train.checkpoint_every=2"])
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(os.path.join(lm_dir, "summary.json"), encoding="utf-8") as f:
    summary = json.load(f)
  # a random 300-token model: about log(300) nats per token
  assert abs(summary["eval_loss"] - math.log(h.hf_config("gpt2_lm")["vocab_size"])) < 1.0

  proc = _run(["-m", "experiments.sample", f"--pretrained={h.fixture('gpt2_lm')}",
               "--prompt=Hello world", "--max_new_tokens=5", "--seed=1"])
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.strip().splitlines()[-1].startswith("Hello world")
