"""From config sections to objects: model, tokenizer, data iterators.

Each kind of thing is chosen by a name looked up in a plain dict (``MODELS``,
``SOURCES``, ``TOKENIZERS``); the rest of the section is passed whole to the chosen
constructor. Add an entry here to make a new model / source usable from a config.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax

from jaxformer.data import embedded
from jaxformer.data import pipeline
from jaxformer.data import sources as sources_lib
from jaxformer.data import tokenizers
from jaxformer.layers.blocks import BlockConfig
from jaxformer.models import registry
from jaxformer.objectives import nsp
from jaxformer.training import task_data

# name -> (config dataclass, module class): the models registry
MODELS = registry.MODELS

# name -> split -> random-access source (``data.source_options`` are passed as keywords:
# ``data_dir=`` for TFDS names, ``num_examples=``/``image_size=`` for synthetic ones)
SOURCES: dict[str, Callable[..., Any]] = {
    "stdlib_text": embedded.stdlib_text_source,
    "stdlib_line_kinds": task_data.LineKindSource,   # local 3-class text classification
    "reversal": sources_lib.SOURCES["reversal"],
    "shapes": sources_lib.SOURCES["shapes"],
    **{name: sources_lib.SOURCES[name] for name in sources_lib.TFDS_DATASETS},
}

TOKENIZERS: dict[str, Callable[[], tokenizers.Tokenizer]] = {
    "bytes": tokenizers.ByteTokenizer,
}


def _lookup(table: Mapping[str, Any], key: str, field: str) -> Any:
  try:
    return table[key]
  except KeyError:
    raise ValueError(f"{field}={key!r} is not known; known: {sorted(table)}") from None


def model_config(section: Mapping[str, Any]) -> Any:
  """The model's frozen config dataclass from ``config.model``.

  ``section["name"]`` picks the model (``MODELS``); the other keys are its fields, the
  block's given nested (``block``) or flat (moved into ``block``), dtypes as strings.
  """
  fields = registry._plain(section)
  name = fields.pop("name", None)
  block_names = {f.name for f in dataclasses.fields(BlockConfig)}
  block = dict(fields.pop("block", None) or {})
  block.update({k: fields.pop(k) for k in list(fields) if k in block_names})
  if block:
    fields["block"] = block
  return registry.config_from_dict(name, fields)


def build_model(section: Mapping[str, Any]) -> tuple[Any, nn.Module]:
  """``(model_config, module)`` from ``config.model``."""
  cfg = model_config(section)
  _, module_cls = MODELS[section["name"]]
  return cfg, module_cls(cfg)


def build_tokenizer(section: Mapping[str, Any]) -> tokenizers.Tokenizer | None:
  """The tokenizer named by ``data.tokenizer`` (None when absent: image data)."""
  if section.get("tokenizer") is None:
    return None
  return _lookup(TOKENIZERS, section["tokenizer"], "data.tokenizer")()


def build_source(section: Mapping[str, Any], split: str) -> Any:
  options = dict(section.get("source_options") or {})
  return _lookup(SOURCES, section["source"], "data.source")(split, **options)


def per_process_batch(global_batch: int, divisor: int) -> int:
  """This process's share of the global batch (ValueError if it does not divide)."""
  count = jax.process_count()
  if global_batch % count or global_batch % divisor:
    raise ValueError(
        f"data.batch_size={global_batch} must be divisible by the process count "
        f"({count}) and by the mesh's data x fsdp size ({divisor})")
  return global_batch // count


def train_iterator(section: Mapping[str, Any], tokenizer: tokenizers.Tokenizer, *,
                   batch_size: int, seed: int):
  """Endless shuffled, packed LM batches of this process's shard of the train split.

  ``data.pipeline`` other than ``"lm"`` (the default) picks one of :data:`PIPELINES`.
  """
  kind = section.get("pipeline", "lm")
  if kind != "lm":
    return _lookup(PIPELINES, kind, "data.pipeline")(
        section, tokenizer, batch_size=batch_size, seed=seed, train=True)
  return pipeline.lm_pipeline(
      build_source(section, section.get("train_split", "train")), tokenizer,
      seq_len=section["seq_len"], batch_size=batch_size, seed=seed,
      shard_index=jax.process_index(), shard_count=jax.process_count(),
      pack=section.get("pack", True), prefetch=section.get("prefetch", 0))


def eval_iterator(section: Mapping[str, Any], tokenizer: tokenizers.Tokenizer, *,
                  batch_size: int):
  """The held-out split in a fixed order (unshuffled, densely packed, one stream).

  Repeats after a full pass, so every process can always take the same number of
  batches (shards of the split may differ in size).
  """
  kind = section.get("pipeline", "lm")
  if kind != "lm":
    return _lookup(PIPELINES, kind, "data.pipeline")(
        section, tokenizer, batch_size=batch_size, seed=0, train=False)
  return pipeline.lm_pipeline(
      build_source(section, section.get("eval_split", "validation")), tokenizer,
      seq_len=section["seq_len"], batch_size=batch_size, seed=0,
      shard_index=jax.process_index(), shard_count=jax.process_count(),
      pack=section.get("pack", True), num_epochs=None, shuffle=False, streams=1)


# --- fixed-size example pipelines (classification, seq2seq, images, NSP pairs) ---------
# Each: (data section, tokenizer, *, batch_size, seed, train) -> iterator. train=True:
# the train split, shuffled, endless, prefetched; train=False: the eval split in a fixed
# order, repeating. Batches are this process's shard.


def _example_kwargs(section: Mapping[str, Any], *, batch_size: int, seed: int,
                    train: bool) -> dict[str, Any]:
  return dict(batch_size=batch_size, seed=seed, shard_index=jax.process_index(),
              shard_count=jax.process_count(), num_epochs=None, shuffle=train,
              prefetch=section.get("prefetch", 0) if train else 0)


def _split(section: Mapping[str, Any], train: bool) -> str:
  if train:
    return section.get("train_split", "train")
  return section.get("eval_split", "validation")


def classification_iterator(section: Mapping[str, Any],
                            tokenizer: tokenizers.Tokenizer | None, *,
                            batch_size: int, seed: int, train: bool):
  """Text classification (``[CLS]`` + tokens, ``labels``): ``classification_pipeline``."""
  return pipeline.classification_pipeline(
      build_source(section, _split(section, train)), tokenizer,
      seq_len=section["seq_len"], text_key=section.get("text_key", "text"),
      label_key=section.get("label_key", "label"),
      **_example_kwargs(section, batch_size=batch_size, seed=seed, train=train))


def seq2seq_iterator(section: Mapping[str, Any], tokenizer: tokenizers.Tokenizer | None,
                     *, batch_size: int, seed: int, train: bool):
  """Source/target pairs for teacher forcing: ``seq2seq_pipeline``."""
  return pipeline.seq2seq_pipeline(
      build_source(section, _split(section, train)), tokenizer,
      source_len=section["source_len"], target_len=section["target_len"],
      source_key=section.get("source_key", "source"),
      target_key=section.get("target_key", "target"),
      **_example_kwargs(section, batch_size=batch_size, seed=seed, train=train))


def image_iterator(section: Mapping[str, Any], tokenizer: tokenizers.Tokenizer | None,
                   *, batch_size: int, seed: int, train: bool):
  """Normalised images and labels: ``image_pipeline`` (``data.mean``/``data.std``)."""
  del tokenizer
  return pipeline.image_pipeline(
      build_source(section, _split(section, train)),
      mean=tuple(section.get("mean", (0.5,))), std=tuple(section.get("std", (0.5,))),
      image_key=section.get("image_key", "image"),
      label_key=section.get("label_key", "label"),
      **_example_kwargs(section, batch_size=batch_size, seed=seed, train=train))


@dataclasses.dataclass(frozen=True)
class _NSPFeatures:
  """NSP record -> the masked-LM task's names (``inputs``, ``token_types``, ...)."""

  def __call__(self, record: dict[str, Any]) -> dict[str, Any]:
    return {"inputs": record["tokens"], "token_types": record["token_types"],
            "inputs_mask": record["inputs_mask"], "nsp_label": record["nsp_label"]}


def nsp_pairs_iterator(section: Mapping[str, Any],
                       tokenizer: tokenizers.Tokenizer | None, *, batch_size: int,
                       seed: int, train: bool):
  """BERT pre-training pairs ``[CLS] A [SEP] B [SEP]`` with ``nsp_label`` (half "next").

  Documents: the first ``data.max_documents`` records of the split, cut at
  ``data.segment_separator`` into (at most ``data.max_segments``) segments of
  <= ``data.seq_len // 2`` tokens
  (:func:`jaxformer.training.task_data.segment_documents`); ``data.num_pairs`` (train)
  / ``data.num_eval_pairs`` pairs drawn by :class:`jaxformer.objectives.nsp.NSPSource`.
  """
  seq_len = section["seq_len"]
  documents = task_data.segment_documents(
      build_source(section, _split(section, train)), tokenizer,
      separator=section.get("segment_separator", "\n\n"),
      max_segment_tokens=max(seq_len // 2, 1),
      max_documents=section.get("max_documents", 1000),
      max_segments=section.get("max_segments"),
      text_key=section.get("text_key", "text"))
  source = nsp.NSPSource(
      documents, seq_len=seq_len, cls_id=tokenizer.cls_id, sep_id=tokenizer.sep_id,
      pad_id=tokenizer.pad_id, seed=seed if train else 1,
      num_examples=section.get("num_pairs" if train else "num_eval_pairs",
                               100_000 if train else 1_000))
  return pipeline.example_pipeline(
      source, _NSPFeatures(),
      **_example_kwargs(section, batch_size=batch_size, seed=seed, train=train))


PIPELINES: dict[str, Callable[..., Any]] = {
    "classification": classification_iterator,
    "seq2seq": seq2seq_iterator,
    "image": image_iterator,
    "nsp_pairs": nsp_pairs_iterator,
}


def example_length(section: Mapping[str, Any], model_cfg: Any) -> int:
  """Tokens per example, for tokens/s and FLOPs: ``seq_len``, source + target length,
  or the image's patches / pixels."""
  if "seq_len" in section:
    return section["seq_len"]
  if "source_len" in section:
    return section["source_len"] + section["target_len"]
  size = getattr(model_cfg, "image_size", 1)
  h, w = (size, size) if isinstance(size, int) else size
  patch = getattr(model_cfg, "patch_size", 1)
  return max((h // patch) * (w // patch), 1)
