"""from_huggingface / to_huggingface against the committed transformers fixtures.

Tolerance: 1e-5 (absolute and relative) on every output in float32; the fixtures'
reference outputs were computed by PyTorch (``make_fixtures.py``, versions in
``fixtures/VERSIONS.json``); the inputs include a row whose attention mask pads its
last 4 positions. When torch and transformers are importable the same comparison also
runs against the live reference, so that a new transformers version is caught.
"""

from __future__ import annotations

import json
import os
import shutil

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import helpers as h
from jaxformer.pretrained import from_huggingface, spec_of, to_huggingface


@pytest.fixture(scope="module")
def loaded():
  cache = {}

  def get(name):
    if name not in cache:
      cache[name] = from_huggingface(h.fixture(name))
    return cache[name]
  return get


@pytest.mark.parametrize("name", h.NAMES)
def test_outputs_match_reference(name, loaded):
  model, params = loaded(name)
  ref = h.reference(name)
  compared = h.compare(h.run(model, params, h.FAMILY[name], ref), ref, name)
  assert "hidden_states" in compared
  if name in ("gpt2_lm", "bert_pretraining", "bert_mlm", "distilbert_mlm",
              "bert_classifier", "vit_classifier"):
    assert "logits" in compared
  if name == "bert_pretraining":
    assert "nsp_logits" in compared
  if name == "bert_model":
    assert "pooled" in compared


@pytest.mark.parametrize("name", ["gpt2_lm", "bert_pretraining"])
def test_outputs_match_without_jit(name, loaded):
  model, params = loaded(name)
  ref = h.reference(name)
  h.compare(h.run(model, params, h.FAMILY[name], ref, jit=False), ref, name)


@pytest.mark.skipif(not h.live_reference_available(),
                    reason="torch + transformers not installed (fixtures cover CI)")
@pytest.mark.parametrize("name", h.NAMES)
def test_outputs_match_live_reference(name, loaded):
  model, params = loaded(name)
  ref = h.make_fixtures.reference_outputs(h.fixture(name), h.FAMILY[name])
  h.compare(h.run(model, params, h.FAMILY[name], ref), ref, name)


def test_checkpoint_settings_reach_the_model(loaded):
  gpt_lm, gpt_base = loaded("gpt2_lm")[0].config, loaded("gpt2_model")[0].config
  block = lambda c: getattr(c, "block", c)  # noqa: E731
  assert block(gpt_lm).activation == "gelu" and block(gpt_base).activation == "gelu_exact"
  assert block(gpt_base).norm_eps == 1e-6 and block(gpt_lm).norm == "pre"
  bert = loaded("bert_model")[0].config
  assert block(bert).norm == "post" and block(bert).norm_eps == 1e-6
  assert bert.type_vocab_size == 3 and block(bert).activation == "gelu"
  pre = loaded("bert_pretraining")[0].config
  assert pre.mlm_head and pre.nsp_head and block(pre).norm_eps == 1e-12
  assert loaded("bert_classifier")[0].config.num_classes == 3
  assert loaded("vit_classifier")[0].config.num_classes == 5
  # GPT's table is padded to vocab_pad_multiple rows (none on a CPU); the padding is
  # zero.
  table = np.asarray(loaded("gpt2_lm")[1]["token_embedding"]["embedding"])
  vocab = h.hf_config("gpt2_lm")["vocab_size"]
  assert table.shape[0] == gpt_lm.padded(vocab) >= vocab and not table[vocab:].any()


def test_scanned_layers_load_stacked(loaded):
  model, params = from_huggingface(h.fixture("gpt2_lm"), overrides={"scan_layers": True})
  assert "layers" in params["decoder"]
  ref = h.reference("gpt2_lm")
  tokens = ref["input_input_ids"][:1].astype(np.int32)
  base_model, base_params = loaded("gpt2_lm")
  np.testing.assert_allclose(jax.jit(model.apply)({"params": params}, tokens),
                             jax.jit(base_model.apply)({"params": base_params}, tokens),
                             atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["gpt2_lm", "bert_pretraining", "bert_classifier",
                                  "bert_model"])
def test_round_trip_is_exact(name, loaded, tmp_path):
  model, params = loaded(name)
  hf_class = to_huggingface(model.config, params, str(tmp_path))
  assert hf_class == h.hf_config(name)["architectures"][0]
  again_model, again = from_huggingface(str(tmp_path))
  assert again_model.config == model.config
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
               params, again)
  # The written tensors are the fixture's own, bit for bit.
  theirs = load_file(os.path.join(h.fixture(name), "model.safetensors"))
  ours = load_file(os.path.join(tmp_path, "model.safetensors"))
  assert set(ours) == set(theirs)
  for key, value in theirs.items():
    np.testing.assert_array_equal(ours[key], value, err_msg=key)


def _copy(name: str, tmp_path) -> str:
  out = os.path.join(tmp_path, name)
  shutil.copytree(h.fixture(name), out)
  return out


def _edit_config(directory: str, **changes) -> None:
  path = os.path.join(directory, "config.json")
  with open(path, encoding="utf-8") as f:
    cfg = json.load(f)
  cfg.update(changes)
  with open(path, "w", encoding="utf-8") as f:
    json.dump(cfg, f)


def test_unknown_family_is_named(tmp_path):
  d = _copy("gpt2_lm", tmp_path)
  _edit_config(d, model_type="llama")
  with pytest.raises(ValueError, match="model_type='llama' is not supported"):
    from_huggingface(d)
  _edit_config(d, model_type="gpt2", activation_function="quick_gelu")
  with pytest.raises(ValueError, match="activation_function='quick_gelu'"):
    from_huggingface(d)


def test_shape_mismatch_names_the_parameter(tmp_path):
  d = _copy("gpt2_lm", tmp_path)
  _edit_config(d, vocab_size=99)
  with pytest.raises(ValueError, match=r"'transformer\.wte\.weight' has shape "
                     r"\(\d+, 32\), but token_embedding/embedding needs \(99, 32\)"):
    from_huggingface(d)


def test_unknown_and_missing_tensors_are_named(tmp_path):
  d = _copy("bert_model", tmp_path)
  path = os.path.join(d, "model.safetensors")
  tensors = load_file(path)
  tensors["encoder.layer.0.attention.self.rotary.weight"] = np.zeros((2,), np.float32)
  save_file(tensors, path, metadata={"format": "pt"})
  with pytest.raises(ValueError, match=r"does not know how to load: "
                     r"\['encoder\.layer\.0\.attention\.self\.rotary\.weight"):
    from_huggingface(d)
  del tensors["encoder.layer.0.attention.self.rotary.weight"]
  del tensors["encoder.layer.1.output.dense.weight"]
  save_file(tensors, path, metadata={"format": "pt"})
  with pytest.raises(ValueError, match=r"encoder/layers_1/mlp/wo/kernel .* missing: "
                     r"\['bert\.encoder\.layer\.1\.output\.dense\.weight'\]"):
    from_huggingface(d)


def test_no_weights_or_config_is_explained(tmp_path):
  with pytest.raises(ValueError, match="has no config.json"):
    spec_of(str(tmp_path))
  d = _copy("gpt2_model", tmp_path)
  os.remove(os.path.join(d, "model.safetensors"))
  with pytest.raises(ValueError, match=r"no \*\.safetensors"):
    from_huggingface(d)


def test_to_huggingface_rejects_what_hf_cannot_express(loaded, tmp_path):
  import dataclasses  # pylint: disable=g-import-not-at-top
  model, params = loaded("gpt2_lm")
  cfg = model.config
  rotary = dataclasses.replace(cfg, positions="rotary")
  with pytest.raises(ValueError, match="positions='rotary' cannot be written"):
    to_huggingface(rotary, params, str(tmp_path))
  vit_model, vit_params = loaded("vit_model")
  with pytest.raises(ValueError, match="writes GPT and BERT models; got ViTConfig"):
    to_huggingface(vit_model.config, vit_params, str(tmp_path))


@pytest.mark.skipif(not h.live_reference_available(),
                    reason="torch + transformers not installed")
@pytest.mark.parametrize("name", ["gpt2_lm", "bert_pretraining", "bert_classifier"])
def test_transformers_loads_what_to_huggingface_writes(name, loaded, tmp_path):
  model, params = loaded(name)
  to_huggingface(model.config, params, str(tmp_path))
  ref = h.make_fixtures.reference_outputs(str(tmp_path), h.FAMILY[name])
  h.compare(h.run(model, params, h.FAMILY[name], ref), ref, name)
