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

from tests.training.training_helpers import updated_names

import helpers as h
from experiments import perplexity as perplexity_cli
from experiments import sample as sample_cli
from experiments.configs import gpt_bytes, imdb_finetune
from jaxformer import tasks
from jaxformer.models import registry
from jaxformer.pretrained import from_huggingface, runs
from jaxformer.training import config as run_config
from jaxformer.training import init as init_lib
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


def _origin(config):
  return run_config.make_origin(init_lib.InitConfig.parse(config.init,
                                                          config.get("finetune")))


def test_configure_takes_the_checkpoints_model_and_tokenizer():
  config = gpt_bytes.get_config("tiny")
  data = tasks.CausalLM.parse_data(config.data)
  scratch = _origin(config)  # init.pretrained unset: the config's own
  assert scratch.configure(config.model) == config.model.to_dict()
  assert scratch.tokenizer(data) is None
  config.init.pretrained = h.fixture("gpt2_lm")
  origin = _origin(config)
  assert isinstance(origin, runs.HuggingFaceOrigin)
  model = origin.configure(config.model)
  hf = h.hf_config("gpt2_lm")
  assert model["vocab_size"] == hf["vocab_size"] and model["max_len"] == 64
  assert model["block"]["num_heads"] == 2 and model["block"]["norm_eps"] == 1e-5
  assert model["remat"] == config.model.remat       # the run's own choices stay
  assert origin.tokenizer(data).vocab_size == hf["vocab_size"]
  parsed = run_config.parse(config)  # the stored config has the checkpoint's model
  assert parsed.stored["model"]["vocab_size"] == hf["vocab_size"]
  config.init.pretrained = h.fixture("bert_model")
  with pytest.raises(ValueError, match="model.name='gpt' cannot take a bert checkpoint"):
    _origin(config).configure(config.model)


def _state(config, origin):
  model_section = origin.configure(config.model)
  cfg, model = registry.build_model(model_section)
  mesh = sharding_lib.Sharding.build(sharding_lib.ShardingConfig(mesh_shape=(1, 1, 1)),
                                     jax.devices()[:1])
  tx = opt_lib.make_optimizer(opt_lib.OptimizerConfig(), 10)
  init_fn = lambda r: model.init(r, jnp.zeros((1, 8), jnp.int32))  # noqa: E731
  state, shardings = state_lib.create_train_state(init_fn, tx, jax.random.key(0), mesh)
  return cfg, state, shardings


def test_load_into_state_body_and_matching_heads():
  config = imdb_finetune.get_config("tiny")
  config.init.pretrained = h.fixture("bert_pretraining")
  origin = _origin(config)
  cfg, state, shardings = _state(config, origin)
  assert cfg.num_classes == 3 and not cfg.mlm_head
  loaded = origin.load(state, shardings.params)
  hf = load_file(os.path.join(h.fixture("bert_pretraining"), "model.safetensors"))
  np.testing.assert_array_equal(loaded.params["pooler"]["kernel"],
                                hf["bert.pooler.dense.weight"].T)
  np.testing.assert_array_equal(loaded.params["token_embedding"]["embedding"],
                                hf["bert.embeddings.word_embeddings.weight"])
  np.testing.assert_array_equal(loaded.params["classifier"]["kernel"],
                                state.params["classifier"]["kernel"])   # fresh head
  assert loaded.params["encoder"]["layers_0"]["mlp"]["wi"]["kernel"].sharding == (
      shardings.params["encoder"]["layers_0"]["mlp"]["wi"]["kernel"])
  assert origin.head(state.params) == ("classifier",)  # the checkpoint has a pooler


def test_frozen_body_from_a_checkpoint_without_pooler_trains_the_pooler():
  """BertForMaskedLM keeps no pooler: the fresh one joins the head (it trains), the
  rest of the body stays frozen, and the log line says what trains."""
  config = imdb_finetune.get_config("tiny")
  config.init.pretrained = h.fixture("bert_mlm")
  config.finetune.freeze_body = True
  origin = _origin(config)
  _, state, shardings = _state(config, origin)
  assert origin.head(state.params) == ("classifier", "pooler")
  loaded = origin.load(state, shardings.params)
  np.testing.assert_array_equal(loaded.params["pooler"]["kernel"],
                                state.params["pooler"]["kernel"])  # fresh
  assert origin.trains(loaded.params) == ["classifier", "pooler"]
  assert updated_names(origin, loaded.params) == ["classifier", "pooler"]
  line = origin.describe(loaded.params)
  count = sum(x.size for n in ("classifier", "pooler")
              for x in jax.tree.leaves(loaded.params[n]))
  assert line.endswith(f"| trainable: classifier, pooler ({count:,} params)"), line
  assert "pooler added to the head" in line and "body frozen" in line
  # A checkpoint with a pooler: it is loaded and frozen with the body.
  config.init.pretrained = h.fixture("bert_pretraining")
  with_pooler = _origin(config)
  assert with_pooler.head(state.params) == ("classifier",)
  assert updated_names(with_pooler, loaded.params) == ["classifier"]


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
