"""Classification of texts (a BERT head on ``[CLS]``) and of images (ViT, axial)."""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax

from jaxformer.data import pipeline
from jaxformer.data.config import DataConfig
from jaxformer.objectives import classification
from jaxformer.tasks import base
from jaxformer.tasks import masked_lm


def _loss(logits_BC: jax.Array, batch: base.Batch,
          label_smoothing: float) -> tuple[jax.Array, base.Metrics]:
  loss, metrics = classification.loss(logits_BC, batch["labels"], batch.get("weights"),
                                      label_smoothing=label_smoothing)
  metrics["num_tokens"] = metrics.pop("num_examples")  # eval weighs by examples
  return loss, metrics


@dataclasses.dataclass(frozen=True, kw_only=True)
class Smoothing:
  """Options of the classification tasks."""
  label_smoothing: float = 0.0


@dataclasses.dataclass(frozen=True, kw_only=True)
class TextClassData(DataConfig):
  """``data`` of text classification: ``seq_len`` tokens per text, the records' label
  feature."""
  seq_len: int = dataclasses.field()  # required (the base class has a default)
  label_key: str = "label"


@dataclasses.dataclass(frozen=True, kw_only=True)
class ImageData(DataConfig):
  """``data`` of image tasks: the image and label features, and the per-channel
  ``mean`` / ``std`` pixels in [0, 1] are normalised with."""
  image_key: str = "image"
  label_key: str = "label"
  mean: tuple[float, ...] = (0.5,)
  std: tuple[float, ...] = (0.5,)


class Classification(base.Task):
  """Softmax classification of texts with a BERT (``model.num_classes > 0``).

  Batches: :class:`jaxformer.data.pipeline.EncodeClassification` (``[CLS] text
  [SEP]``, as BERT's tokenizer and the masked-LM pre-training frame text;
  ``data.text_key``, ``label_key``). Model: ``(inputs, token_types,
  attention_mask) -> {"logits": [B, C]}``. Metrics: ``loss``, ``nll``, ``accuracy``,
  ``num_tokens`` (= real examples).
  """

  name = "classification"
  Options = Smoothing
  Data = TextClassData

  def batches(self, *, batch_size: int, seed: int, train: bool) -> Any:
    data = self.data
    encode = pipeline.EncodeClassification(self.tokenizer, data.seq_len,
                                           data.text_key, data.label_key)
    return pipeline.read(self.source(train), encode, self.read_options(
        batch_size=batch_size, seed=seed, train=train))

  def model_inputs(self, batch: base.Batch) -> tuple[Any, ...]:
    return batch["inputs"], None, masked_lm.valid_mask(batch)

  def loss(self, model: nn.Module, params: Any, batch: base.Batch,
           rng: jax.Array | None, deterministic: bool
           ) -> tuple[jax.Array, base.Metrics]:
    out = self.apply(model, params, batch, rng, deterministic)
    if "logits" not in out:
      raise ValueError("task='classification' needs a BERT with model.num_classes > 0")
    return _loss(out["logits"], batch, self.options.label_smoothing)


class ImageClassification(base.Task):
  """Softmax classification of images (``ViT``, ``AxialClassifier``).

  Batches: :class:`jaxformer.data.pipeline.NormalizeImage` (``data.mean``/``std``,
  ``image_key``, ``label_key``). Model: ``image [B, H, W, C] -> logits [B, C]``.
  Metrics as :class:`Classification`.
  """

  name = "image_classification"
  Options = Smoothing
  Data = ImageData

  def batches(self, *, batch_size: int, seed: int, train: bool) -> Any:
    return image_batches(self, batch_size=batch_size, seed=seed, train=train)

  def example_length(self) -> int:
    return image_length(self.model_config)

  def model_inputs(self, batch: base.Batch) -> tuple[Any, ...]:
    return (batch["image"],)

  def loss(self, model: nn.Module, params: Any, batch: base.Batch,
           rng: jax.Array | None, deterministic: bool
           ) -> tuple[jax.Array, base.Metrics]:
    logits_BC = self.apply(model, params, batch, rng, deterministic)
    return _loss(logits_BC, batch, self.options.label_smoothing)


def image_batches(task: base.Task, *, batch_size: int, seed: int, train: bool) -> Any:
  """Normalised images and labels of ``task``'s data (an :class:`ImageData`)."""
  data = task.data
  normalize = pipeline.NormalizeImage.of(data.mean, data.std, data.image_key,
                                         data.label_key)
  return pipeline.read(task.source(train), normalize, task.read_options(
      batch_size=batch_size, seed=seed, train=train))


def image_length(model_config: Any) -> int:
  """Tokens per image: its patches (``patch_size``) or pixels."""
  size = getattr(model_config, "image_size", 1)
  h, w = (size, size) if isinstance(size, int) else size
  patch = getattr(model_config, "patch_size", 1)
  return max((h // patch) * (w // patch), 1)
