"""Shared by the pretrained tests: fixture paths, running a loaded model like HF does."""

from __future__ import annotations

import json
import os
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURES = os.path.join(HERE, "fixtures")
sys.path.insert(0, HERE)
import make_fixtures  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position

NAMES = tuple(make_fixtures.FIXTURES)
FAMILY = {name: spec[0] for name, spec in make_fixtures.FIXTURES.items()}


def fixture(name: str) -> str:
  return os.path.join(FIXTURES, name)


def reference(name: str) -> dict[str, np.ndarray]:
  with np.load(os.path.join(fixture(name), "reference.npz")) as data:
    return dict(data)


def hf_config(name: str) -> dict:
  with open(os.path.join(fixture(name), "config.json"), encoding="utf-8") as f:
    return json.load(f)


def live_reference_available() -> bool:
  try:
    import torch  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
    import transformers  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    return False
  return True


def _stack_outputs(intermediates: dict, family: str) -> list[np.ndarray]:
  """Hidden states as HF counts them, from ``capture_intermediates``: each layer's
  output; GPT-2's last one after the final norm (ViT's stay before it)."""
  name = next(k for k in ("encoder", "decoder") if k in intermediates)
  stack = intermediates[name]
  layers = sorted((k for k in stack if k.startswith("layers_")),
                  key=lambda k: int(k.split("_")[1]))
  outs = [np.asarray(stack[k]["__call__"][0]) for k in layers]
  final = np.asarray(stack["__call__"][0])
  if family != "vit":
    outs[-1] = final
  return outs + [final]


def run(model: nn.Module, params, family: str, ref: dict[str, np.ndarray], *,
        jit: bool = True) -> dict[str, np.ndarray]:
  """Our outputs on the fixture's inputs, under the names of ``reference.npz``."""

  def forward(params, *args):
    kwargs = {}
    if family == "gpt2":
      kwargs["mask"] = args[1][:, None, None, :].astype(bool)
      args = args[:1]
    elif family in ("bert", "distilbert"):
      kwargs["attention_mask"] = args[1].astype(bool)
      if len(args) > 2:
        kwargs["token_type_ids"] = args[2]
      args = args[:1]
    return model.apply({"params": params}, *args, capture_intermediates=True,
                       mutable=["intermediates"], **kwargs)

  if family == "vit":
    args = (jnp.asarray(ref["input_pixel_values"].transpose(0, 2, 3, 1)),)
  else:
    args = (jnp.asarray(ref["input_input_ids"], jnp.int32),
            jnp.asarray(ref["input_attention_mask"], jnp.int32))
    if "input_token_type_ids" in ref:
      args += (jnp.asarray(ref["input_token_type_ids"], jnp.int32),)
  fn = jax.jit(forward) if jit else forward
  out, state = fn(params, *args)
  hidden = _stack_outputs(state["intermediates"], family)
  got = {"hidden_states": np.stack(hidden[:-1]), "last_hidden_state": hidden[-1]}
  if isinstance(out, dict):
    for ours, theirs in (("mlm_logits", "logits"), ("logits", "logits"),
                         ("nsp_logits", "nsp_logits"), ("pooled", "pooled")):
      if ours in out:
        got[theirs] = np.asarray(out[ours])
  else:
    got["logits"] = np.asarray(out)
  return got


def compare(got: dict[str, np.ndarray], ref: dict[str, np.ndarray], name: str,
            *, atol: float = 1e-5) -> list[str]:
  """Asserts every shared output matches (hidden states after the embeddings); returns
  the keys compared."""
  compared = []
  for key in ("logits", "nsp_logits", "pooled", "last_hidden_state", "hidden_states"):
    if key not in ref or key not in got:
      continue
    want = ref[key][1:] if key == "hidden_states" else ref[key]
    if key == "pooled" and FAMILY[name] == "vit":
      continue  # HF's ViT pooler is dropped (jaxformer's ViT has none)
    if key == "logits" and ref[key].shape != got[key].shape:
      continue  # GPT2Model / BertModel: no HF logits to compare
    np.testing.assert_allclose(got[key], want, atol=atol, rtol=atol,
                               err_msg=f"{name}: {key}")
    compared.append(key)
  return compared
