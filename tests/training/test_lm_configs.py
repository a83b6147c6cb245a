"""Experiment configs: variants, validation, the sizes they promise, run commands."""

from __future__ import annotations

import importlib
import os

import jax
import jax.numpy as jnp
import pytest

from jaxformer.data import vocab
from jaxformer.models import registry
from jaxformer.training import loop

import training_helpers as th

# The causal-LM configs (the other experiments' configs: tests/experiments).
CONFIG_FILES = [os.path.join(th.REPO_ROOT, "experiments", "configs", name)
                for name in ("gpt_bytes.py", "gpt2_small.py")]


def _module(path):
  return importlib.import_module(
      "experiments.configs." + os.path.basename(path)[:-3])


@pytest.mark.parametrize("path", CONFIG_FILES, ids=os.path.basename)
@pytest.mark.parametrize("arg", [None, "tiny"])
def test_configs_validate_and_build(path, arg):
  config = _module(path).get_config(arg)
  loop.validate_config(config)
  registry.build_model(config.model)
  assert "python -m experiments.train" in _module(path).__doc__


@pytest.mark.parametrize("path", CONFIG_FILES, ids=os.path.basename)
def test_unknown_variant_rejected(path):
  with pytest.raises(ValueError, match="'huge'"):
    _module(path).get_config("huge")


def test_gpt_bytes_is_the_nanogpt_cpu_size():
  from experiments.configs import gpt_bytes  # pylint: disable=g-import-not-at-top
  c = gpt_bytes.get_config()
  assert (c.model.num_layers, c.model.embed_dim) == (4, 128)
  assert c.model.block.num_heads == 4
  assert (c.data.seq_len, c.data.batch_size, c.train.num_steps) == (64, 12, 2000)
  assert c.model.vocab_size >= vocab.build_tokenizer(c.data).vocab_size


def test_gpt2_small_has_the_published_parameter_count():
  from experiments.configs import gpt2_small  # pylint: disable=g-import-not-at-top
  cfg, model = registry.build_model(gpt2_small.get_config().model)
  assert cfg.block.dtype == jnp.bfloat16 and cfg.block.param_dtype == jnp.float32
  shapes = jax.eval_shape(model.init, jax.random.key(0),
                          jnp.zeros((1, 8), jnp.int32))
  assert registry.num_params(cfg, shapes["params"]) == 124_439_808


def test_dtype_strings_are_checked():
  with pytest.raises(ValueError, match="model.block.dtype"):
    registry.build_model({"name": "gpt", "block": {"dtype": "bfloat17"}})
