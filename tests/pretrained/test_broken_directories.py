"""Broken Hugging Face directories fail with a ValueError naming the file, through every
door (from_huggingface, init.pretrained, sample, perplexity); to_huggingface takes the
boxed params of model.init."""

from __future__ import annotations

import os
import shutil
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

import helpers as h
from experiments import perplexity as perplexity_lib
from experiments import sample as sample_lib
from jaxformer.pretrained import from_huggingface, load_tokenizer, to_huggingface
from jaxformer.pretrained import runs as pretrained_runs
from jaxformer.training import init as init_lib

WEIGHTS = "model.safetensors"


def _broken(tmp_path, how: str) -> tuple[str, str]:
  """A copy of the gpt2_lm fixture broken ``how``: (directory, the broken file)."""
  d = os.path.join(tmp_path, how)
  shutil.copytree(h.fixture("gpt2_lm"), d)
  weights, config = os.path.join(d, WEIGHTS), os.path.join(d, "config.json")
  if how == "truncated":
    with open(weights, "rb") as f:
      data = f.read()
    with open(weights, "wb") as f:
      f.write(data[:len(data) // 2])
    return d, weights
  if how == "garbage":
    with open(weights, "wb") as f:
      f.write(np.random.default_rng(0).bytes(4096))
    return d, weights
  if how == "config":
    with open(config, "w", encoding="utf-8") as f:
      f.write('{"model_type": "gpt2", "n_embd": ')  # cut off mid-write
    return d, config
  raise AssertionError(how)


def _origin(d):
  """``init.pretrained=d`` as the config reaches it: the Hugging Face origin."""
  return pretrained_runs.HuggingFaceOrigin(
      init_lib.InitConfig(origin="huggingface", path=d))


DOORS = {
    "from_huggingface": from_huggingface,
    "init.pretrained": _origin,
    "sample": lambda d: sample_lib.sample(d, "hello", max_new_tokens=2),
    "perplexity": lambda d: perplexity_lib.perplexity(d, "hello there"),
}


@pytest.mark.parametrize("how", ["truncated", "garbage", "config"])
@pytest.mark.parametrize("door", list(DOORS))
def test_broken_directory_names_the_file(tmp_path, how, door):
  d, broken = _broken(str(tmp_path), how)
  if how != "config" and door == "init.pretrained":
    # the origin reads config.json; the weights are read when the state is loaded
    with pytest.raises(ValueError, match=r"is not a readable safetensors file"):
      _origin(d).load(types.SimpleNamespace(params={}), None)
    return
  want = ("is not valid JSON" if how == "config" else
          "is not a readable safetensors file .*may be truncated")
  with pytest.raises(ValueError, match=want) as info:
    DOORS[door](d)
  assert str(info.value).startswith(broken)


def test_broken_tokenizer_files_name_the_file(tmp_path):
  d = os.path.join(tmp_path, "gpt2")
  shutil.copytree(h.fixture("gpt2_lm"), d)
  with open(os.path.join(d, "vocab.json"), "w", encoding="utf-8") as f:
    f.write("[1, 2")
  with pytest.raises(ValueError, match=r"vocab\.json is not valid JSON"):
    load_tokenizer(d)


def test_to_huggingface_takes_the_boxed_params_of_model_init(tmp_path):
  model, _ = from_huggingface(h.fixture("gpt2_lm"))
  variables = model.init(jax.random.key(1), jnp.zeros((1, 4), jnp.int32))
  boxed = variables["params"]
  assert any(isinstance(x, nn.LogicallyPartitioned) for x in jax.tree.leaves(
      boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned)))
  for i, params in enumerate((boxed, variables)):  # the collection, or all variables
    out = os.path.join(tmp_path, str(i))
    assert to_huggingface(model.config, params, out) == "GPT2LMHeadModel"
    _, again = from_huggingface(out)
    vocab = h.hf_config("gpt2_lm")["vocab_size"]  # rows past it: padding, not written
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a[:vocab], b[:vocab]),
                 nn.meta.unbox(boxed), again)
