"""Hugging Face ``config.json`` <-> jaxformer model configs, one small function per family.

A family reader turns a checkpoint's ``config.json`` into ``(model name, architecture,
heads)``: the architecture is what the weights fix (sizes, activation, norms, epsilons,
tables), the heads are what the checkpoint's class adds on top (MLM, NSP, classifier).
:func:`make_config` builds the model config from them; it is the one place that knows
how our configs are laid out.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from jaxformer.layers.blocks import BlockConfig
from jaxformer.models import registry

# Hugging Face ``hidden_act`` / ``activation_function`` -> our MLP activation. HF's
# "gelu" is the exact (erf) GELU; "gelu_new" / "gelu_pytorch_tanh" / "gelu_fast" are
# the tanh approximation (the same formula, written differently).
ACTIVATIONS = {"gelu": "gelu_exact", "gelu_new": "gelu", "gelu_pytorch_tanh": "gelu",
               "gelu_fast": "gelu", "relu": "relu"}
FAMILIES = ("gpt2", "bert", "distilbert", "vit")


@dataclasses.dataclass(frozen=True)
class Spec:
  """What a checkpoint's ``config.json`` says, in our terms.

  Attributes:
    family: ``model_type`` ("gpt2", "bert", "distilbert", "vit").
    model: our model name (a key of ``jaxformer.models.registry.MODELS``).
    architecture: model fields fixed by the weights (model-level and ``block`` ones).
    heads: model fields of the checkpoint's head(s), e.g. ``{"mlm_head": True}``.
    hf_class: the checkpoint's class, e.g. "BertForPreTraining".
    prefix: the base model's name prefix in its tensor names ("bert", "transformer").
  """
  family: str
  model: str
  architecture: dict[str, Any]
  heads: dict[str, Any]
  hf_class: str
  prefix: str


def _get(hf: Mapping[str, Any], key: str, default: Any = None) -> Any:
  if key in hf:
    return hf[key]
  if default is None:
    raise ValueError(f"config.json has no {key!r}; this is not a complete "
                     f"{hf.get('model_type')} config")
  return default


def _activation(hf: Mapping[str, Any], key: str) -> str:
  name = _get(hf, key, "gelu")
  if name not in ACTIVATIONS:
    raise ValueError(f"config.json {key}={name!r} is not supported; supported: "
                     f"{sorted(ACTIVATIONS)}")
  return ACTIVATIONS[name]


def _require(hf: Mapping[str, Any], key: str, want: Any, default: Any) -> None:
  value = hf.get(key, default)
  if value != want:
    raise ValueError(f"config.json {key}={value!r} is not supported (only {want!r})")


def _num_labels(hf: Mapping[str, Any]) -> int:
  if "id2label" in hf:
    return len(hf["id2label"])
  return int(hf.get("num_labels", 2))


def gpt2_spec(hf: Mapping[str, Any], hf_class: str) -> Spec:
  _require(hf, "scale_attn_weights", True, True)
  _require(hf, "scale_attn_by_inverse_layer_idx", False, False)
  embed = _get(hf, "n_embd")
  arch = dict(vocab_size=_get(hf, "vocab_size"), max_len=_get(hf, "n_positions"),
              num_layers=_get(hf, "n_layer"), embed_dim=embed, positions="learned",
              tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
              block=dict(num_heads=_get(hf, "n_head"),
                         mlp_dim=hf.get("n_inner") or 4 * embed,
                         activation=_activation(hf, "activation_function"), norm="pre",
                         norm_type="layernorm",
                         norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
                         use_bias=True,
                         dropout_rate=float(hf.get("resid_pdrop", 0.1)),
                         attention_dropout_rate=float(hf.get("attn_pdrop", 0.1))))
  return Spec("gpt2", "gpt", arch, {}, hf_class, "transformer")


def bert_spec(hf: Mapping[str, Any], hf_class: str) -> Spec:
  _require(hf, "position_embedding_type", "absolute", "absolute")
  _require(hf, "is_decoder", False, False)
  arch = dict(vocab_size=_get(hf, "vocab_size"),
              max_len=_get(hf, "max_position_embeddings"),
              type_vocab_size=_get(hf, "type_vocab_size", 2),
              num_layers=_get(hf, "num_hidden_layers"), embed_dim=_get(hf, "hidden_size"),
              positions="learned",
              block=dict(num_heads=_get(hf, "num_attention_heads"),
                         mlp_dim=_get(hf, "intermediate_size"),
                         activation=_activation(hf, "hidden_act"), norm="post",
                         norm_type="layernorm",
                         norm_eps=float(hf.get("layer_norm_eps", 1e-12)), use_bias=True,
                         dropout_rate=float(hf.get("hidden_dropout_prob", 0.1)),
                         attention_dropout_rate=float(
                             hf.get("attention_probs_dropout_prob", 0.1))))
  heads = {"BertModel": {}, "BertForMaskedLM": dict(mlm_head=True),
           "BertForPreTraining": dict(mlm_head=True, nsp_head=True),
           "BertForNextSentencePrediction": dict(nsp_head=True),
           "BertForSequenceClassification": dict(num_classes=_num_labels(hf))}
  if hf_class not in heads:
    raise ValueError(f"config.json architectures={[hf_class]}: BERT checkpoints of "
                     f"{sorted(heads)} are supported")
  return Spec("bert", "bert", arch, heads[hf_class], hf_class, "bert")


def distilbert_spec(hf: Mapping[str, Any], hf_class: str) -> Spec:
  # DistilBERT is BERT without token types or pooler: one token type whose embedding
  # is zero adds nothing, so the outputs are exact (see ``mapping.distilbert``).
  arch = dict(vocab_size=_get(hf, "vocab_size"),
              max_len=_get(hf, "max_position_embeddings"), type_vocab_size=1,
              num_layers=_get(hf, "n_layers"), embed_dim=_get(hf, "dim"),
              positions="learned",
              block=dict(num_heads=_get(hf, "n_heads"), mlp_dim=_get(hf, "hidden_dim"),
                         activation=_activation(hf, "activation"), norm="post",
                         norm_type="layernorm", norm_eps=1e-12, use_bias=True,
                         dropout_rate=float(hf.get("dropout", 0.1)),
                         attention_dropout_rate=float(hf.get("attention_dropout", 0.1))))
  heads = {"DistilBertModel": {}, "DistilBertForMaskedLM": dict(mlm_head=True)}
  if hf_class not in heads:
    raise ValueError(f"config.json architectures={[hf_class]}: DistilBERT checkpoints "
                     f"of {sorted(heads)} are supported (a sequence classifier's "
                     "pre_classifier is a ReLU layer that BERT's tanh pooler is not)")
  return Spec("distilbert", "bert", arch, heads[hf_class], hf_class, "distilbert")


def vit_spec(hf: Mapping[str, Any], hf_class: str) -> Spec:
  if hf.get("qkv_bias", True) is not True:
    raise ValueError("config.json qkv_bias=False is not supported")
  arch = dict(image_size=_get(hf, "image_size"), patch_size=_get(hf, "patch_size"),
              num_channels=_get(hf, "num_channels", 3),
              num_layers=_get(hf, "num_hidden_layers"), embed_dim=_get(hf, "hidden_size"),
              positions="learned", pooling="cls",
              block=dict(num_heads=_get(hf, "num_attention_heads"),
                         mlp_dim=_get(hf, "intermediate_size"),
                         activation=_activation(hf, "hidden_act"), norm="pre",
                         norm_type="layernorm",
                         norm_eps=float(hf.get("layer_norm_eps", 1e-12)), use_bias=True,
                         dropout_rate=float(hf.get("hidden_dropout_prob", 0.0)),
                         attention_dropout_rate=float(
                             hf.get("attention_probs_dropout_prob", 0.0))))
  heads = {"ViTModel": dict(num_classes=0),
           "ViTForImageClassification": dict(num_classes=_num_labels(hf))}
  if hf_class not in heads:
    raise ValueError(f"config.json architectures={[hf_class]}: ViT checkpoints of "
                     f"{sorted(heads)} are supported")
  return Spec("vit", "vit", arch, heads[hf_class], hf_class, "vit")


READERS = {"gpt2": gpt2_spec, "bert": bert_spec, "distilbert": distilbert_spec,
           "vit": vit_spec}
DEFAULT_CLASS = {"gpt2": "GPT2LMHeadModel", "bert": "BertModel",
                 "distilbert": "DistilBertModel", "vit": "ViTModel"}


def read_spec(hf: Mapping[str, Any]) -> Spec:
  """The :class:`Spec` of a parsed ``config.json``; ValueError for unknown families."""
  family = hf.get("model_type")
  if family not in READERS:
    raise ValueError(f"config.json model_type={family!r} is not supported; supported "
                     f"families: {list(FAMILIES)}")
  classes = hf.get("architectures") or [DEFAULT_CLASS[family]]
  hf_class = classes[0]
  if family == "gpt2" and hf_class not in ("GPT2LMHeadModel", "GPT2Model"):
    raise ValueError(f"config.json architectures={classes}: GPT-2 checkpoints of "
                     "['GPT2LMHeadModel', 'GPT2Model'] are supported")
  return READERS[family](hf, hf_class)


def _deep_update(base: dict[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
  out = dict(base)
  for key, value in new.items():
    if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
      out[key] = _deep_update(dict(out[key]), value)
    else:
      out[key] = value
  return out


def _nested(section: Mapping[str, Any] | None) -> dict[str, Any]:
  """A plain copy of a model section with flat block fields moved into ``block``."""
  if section is None:
    return {}
  section = section.to_dict() if hasattr(section, "to_dict") else dict(section)
  names = {f.name for f in dataclasses.fields(BlockConfig)}
  block = dict(section.pop("block", None) or {})
  block.update({k: section.pop(k) for k in list(section) if k in names})
  return {**section, "block": block}


def model_section(spec: Spec, section: Mapping[str, Any] | None = None,
                  *, with_heads: bool = True) -> dict[str, Any]:
  """A model section (``{"name": ..., **fields}``) for the checkpoint.

  ``section`` (an experiment's ``config.model``, may be None) supplies everything the
  weights do not fix (heads, dropout, dtypes, remat, attention implementation); the
  checkpoint's architecture overrides it. ``with_heads`` adds the checkpoint's heads
  (when loading a checkpoint as it is, not for a task that chooses its own heads).
  """
  section = _nested(section)
  name = section.pop("name", spec.model)
  if name != spec.model:
    raise ValueError(f"model.name={name!r} cannot take a {spec.family} checkpoint "
                     f"({spec.hf_class}); it needs model.name={spec.model!r}")
  base = registry.preset_dict(_BASE_PRESET[spec.model])
  base.pop("name", None)
  fields = _deep_update(_deep_update(base, section), spec.architecture)
  if with_heads:
    fields = _deep_update(fields, spec.heads)
  return {"name": spec.model, **fields}


# The preset whose non-architecture fields (init scales, dtypes, ...) a loaded model
# starts from before the checkpoint's architecture is laid over it.
_BASE_PRESET = {"gpt": "gpt2_small", "bert": "bert_base", "vit": "vit_b16"}


def build(section: Mapping[str, Any]) -> tuple[Any, Any]:
  """``(config, module)`` of a model section (the registry's ``build_model``)."""
  return registry.build_model(section)


def hf_config(model_name: str, cfg: Any, hf_class: str) -> dict[str, Any]:
  """The ``config.json`` of a GPT-2 or BERT checkpoint for our config ``cfg``."""
  b = getattr(cfg, "block", cfg)
  act = {v: k for k, v in ACTIVATIONS.items() if k in ("gelu", "gelu_new", "relu")}
  common = dict(architectures=[hf_class], torch_dtype="float32")
  if model_name == "gpt":
    return dict(common, model_type="gpt2", vocab_size=cfg.vocab_size,
                n_positions=cfg.max_len, n_ctx=cfg.max_len, n_embd=cfg.embed_dim,
                n_layer=cfg.num_layers, n_head=b.num_heads, n_inner=b.mlp_dim,
                activation_function=act[b.activation], layer_norm_epsilon=b.norm_eps,
                resid_pdrop=b.dropout_rate, embd_pdrop=b.dropout_rate,
                attn_pdrop=b.attention_dropout_rate,
                tie_word_embeddings=cfg.tie_embeddings,
                bos_token_id=cfg.vocab_size - 1, eos_token_id=cfg.vocab_size - 1)
  out = dict(common, model_type="bert", vocab_size=cfg.vocab_size,
             max_position_embeddings=cfg.max_len, type_vocab_size=cfg.type_vocab_size,
             hidden_size=cfg.embed_dim, num_hidden_layers=cfg.num_layers,
             num_attention_heads=b.num_heads, intermediate_size=b.mlp_dim,
             hidden_act=act[b.activation], layer_norm_eps=b.norm_eps,
             hidden_dropout_prob=b.dropout_rate,
             attention_probs_dropout_prob=b.attention_dropout_rate,
             position_embedding_type="absolute", pad_token_id=0)
  if cfg.num_classes:
    out["id2label"] = {str(i): f"LABEL_{i}" for i in range(cfg.num_classes)}
    out["label2id"] = {f"LABEL_{i}": i for i in range(cfg.num_classes)}
  return out


NO_POOLER = ("BertForMaskedLM",)
_BASE_CLASSES = ("GPT2Model", "BertModel", "DistilBertModel", "ViTModel")


def export_class(cfg: Any) -> tuple[str, str]:
  """``(model name, HF class)`` a config is written as; ValueError naming the field
  that a GPT-2 / BERT checkpoint cannot express."""
  name = next((n for n, (cls, _) in registry.MODELS.items()
               if n in ("gpt", "bert") and isinstance(cfg, cls)), None)
  if name is None:
    raise ValueError(f"to_huggingface writes GPT and BERT models; got "
                     f"{type(cfg).__name__}")
  b = getattr(cfg, "block", cfg)
  head_dim = cfg.embed_dim // b.num_heads
  wanted = {"positions": "learned", "norm": "pre" if name == "gpt" else "post",
            "norm_type": "layernorm", "use_bias": True, "attention_scale_multiplier": 1.0,
            "attention_hard": False}
  optional = {"num_kv_heads": b.num_heads, "head_dim": head_dim,
              "value_head_dim": head_dim, "qkv_bias": True, "out_bias": True}
  for field, want in wanted.items():
    value = getattr(cfg, field, getattr(b, field, want))
    if value != want:
      raise ValueError(f"to_huggingface: {field}={value!r} cannot be written as a "
                       f"{name} Hugging Face checkpoint (it needs {want!r})")
  for field, want in optional.items():
    value = getattr(b, field, None)
    if value not in (None, want):
      raise ValueError(f"to_huggingface: block.{field}={value!r} cannot be written "
                       f"(a Hugging Face {name} checkpoint has {want!r})")
  if getattr(cfg, "scale_embeddings", None):
    raise ValueError(f"to_huggingface: scale_embeddings={cfg.scale_embeddings!r} cannot "
                     f"be written (a Hugging Face {name} checkpoint has unscaled "
                     "embeddings; it needs None or False)")
  if b.activation not in ("gelu", "gelu_exact", "relu"):
    raise ValueError(f"to_huggingface: activation={b.activation!r}; expected one of "
                     "'gelu', 'gelu_exact', 'relu'")
  if name == "gpt":
    return name, "GPT2LMHeadModel"
  if cfg.pooling != "cls":
    raise ValueError(f"to_huggingface: pooling={cfg.pooling!r}; BERT checkpoints "
                     "have the 'cls' pooler")
  if cfg.num_classes and (cfg.mlm_head or cfg.nsp_head):
    raise ValueError("to_huggingface: a BERT with num_classes and mlm_head/nsp_head "
                     "has no Hugging Face class; keep one kind of head")
  if cfg.num_classes:
    return name, "BertForSequenceClassification"
  return name, {(True, True): "BertForPreTraining", (True, False): "BertForMaskedLM",
                (False, True): "BertForNextSentencePrediction",
                (False, False): "BertModel"}[(cfg.mlm_head, cfg.nsp_head)]


def export_name(name: str, spec: Spec) -> str:
  """The tensor name in a checkpoint of ``spec.hf_class`` (base models: no prefix)."""
  if spec.hf_class in _BASE_CLASSES and name.startswith(spec.prefix + "."):
    return name[len(spec.prefix) + 1:]
  return name
