"""Parameter maps: our parameter paths <-> Hugging Face tensor names, per family.

A :class:`Rule` says which HF tensors (names and shapes) make one of our parameters and
how: ``to_ours(*hf_arrays) -> ours`` and its exact inverse ``to_hf(ours) -> hf_arrays``
(transposes and reshapes only, so a round trip is bit-exact). Layouts:

* HF ``nn.Linear`` weights are ``[out, in]``; GPT-2's ``Conv1D`` weights are already
  ``[in, out]`` like our kernels, so they are not transposed.
* Our fused self-attention kernel is ``qkv [E, 3, H, D]`` (bias ``[3, H, D]``): BERT /
  DistilBERT / ViT's separate ``query``/``key``/``value`` are stacked on axis 1;
  GPT-2's ``c_attn [E, 3 * H * D]`` is reshaped (its columns are q | k | v, head-major).
* The attention output kernel is ``out [H, D, E]``.
* ViT's patch convolution ``[D, C, P, P]`` becomes ``[P * P * C, D]`` in (row, col,
  channel) order, our ``PatchEmbed`` layout.

Paths are the plain-loop ones (``layers_0`` ...); the loader stacks them for scanned
models. The maps read sizes from a :class:`~jaxformer.pretrained.families.Spec`, never
from a model config, so they do not depend on how configs are laid out.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np

from jaxformer.pretrained.families import Spec

Path = tuple[str, ...]
Shape = tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class Rule:
  """One of our parameters from (and back to) one or more HF tensors.

  ``vocab_axis``: our axis that may be longer than the checkpoint's (GPT's vocabulary
  padded to ``vocab_pad_multiple``): the loader pads it with zeros, the writer slices
  the padding off.
  """
  names: tuple[str, ...]
  shapes: tuple[Shape, ...]
  to_ours: Callable[..., np.ndarray]
  to_hf: Callable[[np.ndarray], tuple[np.ndarray, ...]]
  vocab_axis: int | None = None


def copy(name: str, shape: Shape, vocab_axis: int | None = None) -> Rule:
  return Rule((name,), (tuple(shape),), lambda x: x, lambda x: (x,), vocab_axis)


def reshaped(name: str, hf_shape: Shape, our_shape: Shape) -> Rule:
  return Rule((name,), (tuple(hf_shape),), lambda x: x.reshape(our_shape),
              lambda x: (x.reshape(hf_shape),))


def linear(name: str, d_in: int, d_out: int, vocab_axis: int | None = None) -> Rule:
  """``nn.Linear`` weight ``[out, in]`` -> kernel ``[in, out]``."""
  return Rule((name,), ((d_out, d_in),), lambda w: w.T,
              lambda k: (np.ascontiguousarray(k.T),), vocab_axis)


def qkv_linear(names: tuple[str, str, str], e: int, h: int, d: int) -> Rule:
  """Three ``nn.Linear`` weights ``[H*D, E]`` -> ``[E, 3, H, D]``."""
  def to_ours(q, k, v):
    return np.stack([q.T, k.T, v.T], axis=1).reshape(e, 3, h, d)

  def to_hf(kernel):
    flat = kernel.reshape(e, 3, h * d)
    return tuple(np.ascontiguousarray(flat[:, i].T) for i in range(3))
  return Rule(names, ((h * d, e),) * 3, to_ours, to_hf)


def qkv_bias(names: tuple[str, str, str], h: int, d: int) -> Rule:
  """Three biases ``[H*D]`` -> ``[3, H, D]``."""
  return Rule(names, ((h * d,),) * 3, lambda q, k, v: np.stack([q, k, v]).reshape(3, h, d),
              lambda b: tuple(b.reshape(3, h * d)))


def out_linear(name: str, h: int, d: int, e: int) -> Rule:
  """``nn.Linear`` weight ``[E, H*D]`` -> ``out [H, D, E]``."""
  return Rule((name,), ((e, h * d),), lambda w: w.T.reshape(h, d, e),
              lambda k: (np.ascontiguousarray(k.reshape(h * d, e).T),))


def patch_conv(name: str, dim: int, channels: int, patch: int) -> Rule:
  """Conv2d weight ``[D, C, P, P]`` -> ``[P * P * C, D]`` ((row, col, channel) order)."""
  def to_ours(w):
    return w.transpose(2, 3, 1, 0).reshape(patch * patch * channels, dim)

  def to_hf(k):
    return (np.ascontiguousarray(
        k.reshape(patch, patch, channels, dim).transpose(3, 2, 0, 1)),)
  return Rule((name,), ((dim, channels, patch, patch),), to_ours, to_hf)


def norm(prefix: str, e: int) -> dict[str, Rule]:
  """LayerNorm ``weight``/``bias`` -> ``scale``/``bias``."""
  return {"scale": copy(f"{prefix}.weight", (e,)), "bias": copy(f"{prefix}.bias", (e,))}


def dense(prefix: str, d_in: int, d_out: int) -> dict[str, Rule]:
  return {"kernel": linear(f"{prefix}.weight", d_in, d_out),
          "bias": copy(f"{prefix}.bias", (d_out,))}


def _sizes(spec: Spec) -> tuple[int, int, int, int, int]:
  a = spec.architecture
  e, b = a["embed_dim"], a["block"]
  h = b["num_heads"]
  return a["num_layers"], e, h, e // h, b["mlp_dim"]


def _flatten(tree: dict[str, Any], prefix: Path = ()) -> dict[Path, Rule]:
  out = {}
  for key, value in tree.items():
    if isinstance(value, Rule):
      out[prefix + (key,)] = value
    else:
      out.update(_flatten(value, prefix + (key,)))
  return out


def gpt2(spec: Spec) -> dict[Path, Rule]:
  layers, e, h, d, f = _sizes(spec)
  a = spec.architecture
  p = "transformer."
  tree: dict[str, Any] = {
      "token_embedding": {"embedding": copy(p + "wte.weight", (a["vocab_size"], e),
                                                         vocab_axis=0)},
      "position_embedding": {"embedding": copy(p + "wpe.weight", (a["max_len"], e))},
      "decoder": {"final_norm": norm(p + "ln_f", e)}}
  for i in range(layers):
    q = f"{p}h.{i}."
    tree["decoder"][f"layers_{i}"] = {
        "attention_norm": norm(q + "ln_1", e),
        "self_attention": {
            "qkv": {"kernel": reshaped(q + "attn.c_attn.weight", (e, 3 * e), (e, 3, h, d)),
                    "bias": reshaped(q + "attn.c_attn.bias", (3 * e,), (3, h, d))},
            "out": {"kernel": reshaped(q + "attn.c_proj.weight", (e, e), (h, d, e)),
                    "bias": copy(q + "attn.c_proj.bias", (e,))}},
        "mlp_norm": norm(q + "ln_2", e),
        "mlp": {"wi": {"kernel": copy(q + "mlp.c_fc.weight", (e, f)),
                       "bias": copy(q + "mlp.c_fc.bias", (f,))},
                "wo": {"kernel": copy(q + "mlp.c_proj.weight", (f, e)),
                       "bias": copy(q + "mlp.c_proj.bias", (e,))}}}
  if not a.get("tie_embeddings", True):
    tree["lm_head"] = {"kernel": linear("lm_head.weight", e, a["vocab_size"],
                                          vocab_axis=1)}
  return _flatten(tree)


def _bert_layer(q: str, e: int, h: int, d: int, f: int) -> dict[str, Any]:
  return {
      "self_attention": {
          "qkv": {"kernel": qkv_linear(tuple(f"{q}attention.self.{n}.weight"
                                             for n in ("query", "key", "value")), e, h, d),
                  "bias": qkv_bias(tuple(f"{q}attention.self.{n}.bias"
                                         for n in ("query", "key", "value")), h, d)},
          "out": {"kernel": out_linear(q + "attention.output.dense.weight", h, d, e),
                  "bias": copy(q + "attention.output.dense.bias", (e,))}},
      "attention_norm": norm(q + "attention.output.LayerNorm", e),
      "mlp": {"wi": dense(q + "intermediate.dense", e, f),
              "wo": dense(q + "output.dense", f, e)},
      "mlp_norm": norm(q + "output.LayerNorm", e)}


def bert(spec: Spec) -> dict[Path, Rule]:
  layers, e, h, d, f = _sizes(spec)
  a, heads = spec.architecture, spec.heads
  p = "bert.embeddings."
  tree: dict[str, Any] = {
      "token_embedding": {"embedding": copy(p + "word_embeddings.weight",
                                            (a["vocab_size"], e))},
      "position_embedding": {"embedding": copy(p + "position_embeddings.weight",
                                               (a["max_len"], e))},
      "token_type_embedding": {"embedding": copy(p + "token_type_embeddings.weight",
                                                 (a["type_vocab_size"], e))},
      "embedding_norm": norm(p + "LayerNorm", e),
      "encoder": {f"layers_{i}": _bert_layer(f"bert.encoder.layer.{i}.", e, h, d, f)
                  for i in range(layers)},
      "pooler": dense("bert.pooler.dense", e, e),
      "mlm_transform": dense("cls.predictions.transform.dense", e, e),
      "mlm_norm": norm("cls.predictions.transform.LayerNorm", e),
      "mlm_bias": copy("cls.predictions.bias", (a["vocab_size"],)),
      "nsp": dense("cls.seq_relationship", e, 2)}
  if heads.get("num_classes"):
    tree["classifier"] = dense("classifier", e, heads["num_classes"])
  return _flatten(tree)


def distilbert(spec: Spec) -> dict[Path, Rule]:
  layers, e, h, d, f = _sizes(spec)
  a = spec.architecture
  p = "distilbert."
  zero_types = Rule((), (), lambda: np.zeros((1, e), np.float32), lambda x: ())
  tree: dict[str, Any] = {
      "token_embedding": {"embedding": copy(p + "embeddings.word_embeddings.weight",
                                            (a["vocab_size"], e))},
      "position_embedding": {"embedding": copy(p + "embeddings.position_embeddings.weight",
                                               (a["max_len"], e))},
      "token_type_embedding": {"embedding": zero_types},
      "embedding_norm": norm(p + "embeddings.LayerNorm", e),
      "encoder": {},
      "mlm_transform": dense("vocab_transform", e, e),
      "mlm_norm": norm("vocab_layer_norm", e),
      "mlm_bias": copy("vocab_projector.bias", (a["vocab_size"],))}
  for i in range(layers):
    q = f"{p}transformer.layer.{i}."
    tree["encoder"][f"layers_{i}"] = {
        "self_attention": {
            "qkv": {"kernel": qkv_linear(tuple(f"{q}attention.{n}_lin.weight"
                                               for n in "qkv"), e, h, d),
                    "bias": qkv_bias(tuple(f"{q}attention.{n}_lin.bias" for n in "qkv"),
                                     h, d)},
            "out": {"kernel": out_linear(q + "attention.out_lin.weight", h, d, e),
                    "bias": copy(q + "attention.out_lin.bias", (e,))}},
        "attention_norm": norm(q + "sa_layer_norm", e),
        "mlp": {"wi": dense(q + "ffn.lin1", e, f), "wo": dense(q + "ffn.lin2", f, e)},
        "mlp_norm": norm(q + "output_layer_norm", e)}
  return _flatten(tree)


def vit(spec: Spec) -> dict[Path, Rule]:
  layers, e, h, d, f = _sizes(spec)
  a, heads = spec.architecture, spec.heads
  n = (a["image_size"] // a["patch_size"]) ** 2 + 1
  p = "vit."
  tree: dict[str, Any] = {
      "patch_embedding": {
          "kernel": patch_conv(p + "embeddings.patch_embeddings.projection.weight", e,
                               a["num_channels"], a["patch_size"]),
          "bias": copy(p + "embeddings.patch_embeddings.projection.bias", (e,))},
      "cls_token": copy(p + "embeddings.cls_token", (1, 1, e)),
      "position_embedding": {"embedding": reshaped(p + "embeddings.position_embeddings",
                                                   (1, n, e), (n, e))},
      "encoder": {"final_norm": norm(p + "layernorm", e)}}
  for i in range(layers):
    q = f"{p}encoder.layer.{i}."
    tree["encoder"][f"layers_{i}"] = {
        "attention_norm": norm(q + "layernorm_before", e),
        "self_attention": {
            "qkv": {"kernel": qkv_linear(tuple(f"{q}attention.attention.{m}.weight"
                                               for m in ("query", "key", "value")),
                                         e, h, d),
                    "bias": qkv_bias(tuple(f"{q}attention.attention.{m}.bias"
                                           for m in ("query", "key", "value")), h, d)},
            "out": {"kernel": out_linear(q + "attention.output.dense.weight", h, d, e),
                    "bias": copy(q + "attention.output.dense.bias", (e,))}},
        "mlp_norm": norm(q + "layernorm_after", e),
        "mlp": {"wi": dense(q + "intermediate.dense", e, f),
                "wo": dense(q + "output.dense", f, e)}}
  if heads.get("num_classes"):
    tree["head"] = dense("classifier", e, heads["num_classes"])
  return _flatten(tree)


RULES = {"gpt2": gpt2, "bert": bert, "distilbert": distilbert, "vit": vit}

# Tensors a checkpoint may hold that carry nothing for us: buffers (causal masks,
# position ids) and the copies of tied output layers. ``ignored(name)`` is True for them.
_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", "embeddings.position_ids")
TIED = {"gpt2": ("lm_head.weight",),
        "bert": ("cls.predictions.decoder.weight", "cls.predictions.decoder.bias"),
        "distilbert": ("vocab_projector.weight",), "vit": ()}
# Weights of the checkpoint's class that our model has no place for (dropped with a
# warning that says why).
DROPPED = {"vit": {"vit.pooler.dense.weight": "jaxformer's ViT has no pooler (it uses "
                   "the [CLS] hidden state after the final norm, as ViTForImage"
                   "Classification does)",
                   "vit.pooler.dense.bias": "see vit.pooler.dense.weight"}}


def ignored(family: str, name: str) -> bool:
  return name.endswith(_IGNORED_SUFFIXES) or name in TIED[family]


# Our top-level parameters a checkpoint need not have (task heads; BERT's pooler is
# absent from BertForMaskedLM): left as initialised when missing.
OPTIONAL = ("pooler", "mlm_transform", "mlm_norm", "mlm_bias", "nsp", "classifier",
            "head", "lm_head")
