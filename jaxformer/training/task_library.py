"""The tasks beyond causal LM: masked LM (± NSP), seq2seq, classification, image LM.

Every task has the :class:`~jaxformer.training.steps.TaskFn` signature
``(model, params, batch, rng, deterministic) -> (loss, metrics)`` plus keyword options
that come from ``config.task_options`` (bound by :func:`jaxformer.training.tasks.get_task`;
a ``tokenizer`` keyword receives the run's tokenizer). ``metrics["num_tokens"]`` is the
weight the other metrics are means over (masked tokens, target tokens, examples or
pixels), so that eval averages them exactly over batches.

========================  ==================  ===========================  ===============
task                      model               batch (pipeline)             counts
========================  ==================  ===========================  ===============
``masked_lm``             BERT (mlm_head)     ``inputs`` [+ ``inputs_mask``,  masked tokens
                                              ``token_types``, ``nsp_label``]
``seq2seq``               EncoderDecoder      ``seq2seq`` pipeline         target tokens
``classification``        BERT (num_classes), ``classification`` (text) /  examples
                          ViT, AxialClassifier ``image`` pipeline
``image_lm``              ImageGPT            ``image`` pipeline (pixels   pixels
                                              in [0, 1]: mean 0, std 1)
``axial_lm``              AxialTransformer    ``image`` pipeline (same)    pixels
========================  ==================  ===========================  ===============

``seq2seq`` also has an *extra eval* (:data:`EXTRA_EVALS`): BLEU of greedy
translations of the first ``train.bleu_batches`` eval batches
(:mod:`jaxformer.training.seq2seq_eval`).

Masking for MLM happens here, inside the step, with the step's rng (a fresh mask every
step); eval (``rng=None``) uses a fixed key, so every eval sees the same masks.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxformer.models import image_gpt
from jaxformer.objectives import causal_lm
from jaxformer.objectives import classification
from jaxformer.objectives import masked_lm
from jaxformer.objectives import nsp as nsp_lib
from jaxformer.objectives import seq2seq
from jaxformer.training import seq2seq_eval
from jaxformer.training.steps import Batch, Metrics

EVAL_MASK_SEED = 0


def _rngs(rng: jax.Array | None, deterministic: bool) -> dict[str, jax.Array]:
  return {"dropout": rng} if rng is not None and not deterministic else {}


def _valid_mask(batch: Batch) -> jax.Array:
  """``[B, L]`` bool, True on real tokens: ``inputs_mask``, else ``segment_ids > 0``."""
  if "inputs_mask" in batch:
    return batch["inputs_mask"].astype(bool)
  if "segment_ids" in batch:
    return batch["segment_ids"] > 0
  return jnp.ones(batch["inputs"].shape, bool)


# --- masked LM (BERT), optionally with next-sentence prediction ---------------------------


def masked_lm_task(model: nn.Module, params: Any, batch: Batch,
                   rng: jax.Array | None, deterministic: bool, *, tokenizer: Any,
                   nsp: bool = False, mask_rate: float = 0.15,
                   replace_mask: float = 0.8, replace_random: float = 0.1
                   ) -> tuple[jax.Array, Metrics]:
  """BERT pre-training: masked LM, plus NSP when ``nsp``.

  Args:
    model: ``BERT`` with ``mlm_head=True`` (and ``nsp_head=True`` when ``nsp``).
    params: its parameters.
    batch: ``inputs`` int ``[B, L]`` (unmasked); optional ``inputs_mask`` bool
      ``[B, L]`` (else ``segment_ids > 0``, else all real), ``token_types`` int
      ``[B, L]``; with ``nsp``: ``nsp_label`` int ``[B]`` and example ``weights``
      ``[B]``.
    rng: the step key: split into the masking key and the dropout key. None (eval):
      masks from the fixed key ``EVAL_MASK_SEED``.
    deterministic: disables dropout.
    tokenizer: gives ``mask_id``, ``special_ids`` (never masked) and ``vocab_size``
      (random replacements are drawn from its non-special ids).
    nsp: add the next-sentence loss (``loss = mlm_loss + nsp_loss``).
    mask_rate, replace_mask, replace_random: see
      :func:`jaxformer.objectives.masked_lm.mask_tokens`.
  Returns:
    ``(loss, metrics)``: ``loss``, ``mlm_loss``, ``nll``/``accuracy`` (MLM, over the
    chosen positions), ``num_tokens`` (chosen positions); with ``nsp`` also
    ``nsp_loss``, ``nsp_accuracy``.
  """
  if rng is None:
    mask_key, dropout_key = jax.random.key(EVAL_MASK_SEED), None
  else:
    mask_key, dropout_key = jax.random.split(rng)
  valid_BL = _valid_mask(batch)
  inputs_BL, targets_BL, weights_BL = masked_lm.mask_tokens(
      mask_key, batch["inputs"], vocab_size=tokenizer.vocab_size,
      mask_id=tokenizer.mask_id, special_ids=tokenizer.special_ids,
      mask_rate=mask_rate, replace_mask=replace_mask, replace_random=replace_random)
  weights_BL = weights_BL * valid_BL.astype(jnp.float32)
  out = model.apply({"params": params}, inputs_BL,
                    token_type_ids=batch.get("token_types"), attention_mask=valid_BL,
                    deterministic=deterministic, rngs=_rngs(dropout_key, deterministic))
  if "mlm_logits" not in out:
    raise ValueError("task='masked_lm' needs a BERT with model.mlm_head=True")
  loss, metrics = masked_lm.loss(out["mlm_logits"], targets_BL, weights_BL)
  metrics["mlm_loss"] = loss
  if nsp:
    if "nsp_logits" not in out:
      raise ValueError("task_options.nsp=True needs model.nsp_head=True")
    nsp_loss, nsp_metrics = nsp_lib.loss(out["nsp_logits"], batch["nsp_label"],
                                         batch.get("weights"))
    loss = loss + nsp_loss
    metrics["nsp_loss"] = nsp_loss
    metrics["nsp_accuracy"] = nsp_metrics["accuracy"]
  metrics["loss"] = loss
  return loss, metrics


# --- sequence to sequence ----------------------------------------------------------------


def seq2seq_task(model: nn.Module, params: Any, batch: Batch, rng: jax.Array | None,
                 deterministic: bool, *, label_smoothing: float = 0.1
                 ) -> tuple[jax.Array, Metrics]:
  """Teacher-forced encoder-decoder training with label smoothing.

  Args:
    model: ``EncoderDecoder``.
    params: its parameters.
    batch: the ``seq2seq`` pipeline's ``inputs``/``inputs_mask`` ``[B, Ls]``,
      ``decoder_inputs``/``targets``/``weights`` ``[B, Lt]``.
    rng: dropout key.
    deterministic: disables dropout.
    label_smoothing: ``eps`` of :func:`jaxformer.objectives.seq2seq.loss`.
  Returns:
    ``(loss, metrics)``: ``loss`` (smoothed), ``nll``, ``accuracy`` (per target token),
    ``num_tokens``.
  """
  logits_BTV = model.apply({"params": params}, batch["inputs"],
                           batch["decoder_inputs"], source_mask=batch["inputs_mask"],
                           deterministic=deterministic, rngs=_rngs(rng, deterministic))
  return seq2seq.loss(logits_BTV, batch["targets"], batch["weights"],
                      label_smoothing=label_smoothing)


# --- classification (text or images) ----------------------------------------------------


def classification_task(model: nn.Module, params: Any, batch: Batch,
                        rng: jax.Array | None, deterministic: bool, *,
                        label_smoothing: float = 0.0) -> tuple[jax.Array, Metrics]:
  """Softmax classification of texts (BERT head) or images (ViT, AxialClassifier).

  Args:
    model: ``BERT`` with ``num_classes > 0`` (its ``"logits"`` output, on the pooled
      ``[CLS]`` vector) when the batch has ``inputs``; else an image classifier
      ``images [B, H, W, C] -> logits [B, C]``.
    params: its parameters.
    batch: ``labels`` int ``[B]``, ``weights`` ``[B]`` and either ``inputs`` /
      ``inputs_mask`` ``[B, L]`` (``classification`` pipeline) or ``image``
      ``[B, H, W, C]`` (``image`` pipeline).
    rng: dropout key.
    deterministic: disables dropout.
    label_smoothing: see :func:`jaxformer.objectives.classification.loss`.
  Returns:
    ``(loss, metrics)``: ``loss``, ``nll``, ``accuracy``, ``num_tokens`` (= examples).
  """
  rngs = _rngs(rng, deterministic)
  if "inputs" in batch:
    out = model.apply({"params": params}, batch["inputs"],
                      attention_mask=_valid_mask(batch), deterministic=deterministic,
                      rngs=rngs)
    if "logits" not in out:
      raise ValueError("task='classification' on text needs a BERT with "
                       "model.num_classes > 0")
    logits_BC = out["logits"]
  else:
    logits_BC = model.apply({"params": params}, batch["image"],
                            deterministic=deterministic, rngs=rngs)
  loss, metrics = classification.loss(logits_BC, batch["labels"], batch.get("weights"),
                                      label_smoothing=label_smoothing)
  metrics["num_tokens"] = metrics.pop("num_examples")
  return loss, metrics


# --- generative image models ------------------------------------------------------------


def grid_palette(levels: int, channels: int) -> np.ndarray:
  """``levels ** channels`` colors in ``[0, 1]^channels`` on a regular grid.

  Color ``k`` has channel ``c`` at level ``(k // levels**c) % levels``, so
  :func:`jaxformer.models.color_quantize` with this palette rounds every channel to the
  nearest of ``levels`` evenly spaced values.
  """
  if levels < 2 or channels < 1:
    raise ValueError(f"grid_palette: levels={levels} must be >= 2 and channels="
                     f"{channels} >= 1")
  k = np.arange(levels ** channels)
  digits = np.stack([(k // levels ** c) % levels for c in range(channels)], axis=-1)
  return (digits / (levels - 1)).astype(np.float32)


def quantize_images(images_BHWC: jax.Array, *, levels: int,
                    num_clusters: int) -> jax.Array:
  """Pixels in ``[0, 1]`` -> palette ids ``[B, H, W]`` of the ``levels``-grid palette.

  Raises ValueError unless ``num_clusters == levels ** channels`` (the model's
  vocabulary must be the palette).
  """
  channels = images_BHWC.shape[-1]
  if levels ** channels != num_clusters:
    raise ValueError(
        f"task_options.levels={levels} gives {levels}**{channels} = "
        f"{levels ** channels} colors for {channels}-channel images, but "
        f"model.num_clusters={num_clusters}; they must be equal")
  palette_KC = jnp.asarray(grid_palette(levels, channels))
  return image_gpt.color_quantize(jnp.clip(images_BHWC, 0.0, 1.0), palette_KC)


def _pixel_weights(batch: Batch, shape: tuple[int, int]) -> jax.Array:
  w_B = batch.get("weights")
  if w_B is None:
    return jnp.ones(shape, jnp.float32)
  return jnp.broadcast_to(w_B.astype(jnp.float32)[:, None], shape)


def image_lm_task(model: nn.Module, params: Any, batch: Batch, rng: jax.Array | None,
                  deterministic: bool, *, levels: int = 4) -> tuple[jax.Array, Metrics]:
  """ImageGPT: next-pixel prediction over palette ids in raster order.

  Args:
    model: ``ImageGPT`` (``num_clusters == levels ** channels``).
    params: its parameters.
    batch: ``image`` float ``[B, H, W, C]`` with pixels in ``[0, 1]`` (the ``image``
      pipeline with ``mean=0, std=1``), example ``weights`` ``[B]``.
    rng: dropout key.
    deterministic: disables dropout.
    levels: palette levels per channel.
  Returns:
    ``causal_lm.loss`` over all pixels: ``loss``, ``nll``, ``accuracy``,
    ``bits_per_token`` (bits per pixel), ``num_tokens`` (pixels).
  """
  cfg = model.config
  ids_BHW = quantize_images(batch["image"], levels=levels,
                            num_clusters=cfg.num_clusters)
  inputs_BL, targets_BL = image_gpt.image_gpt_inputs(ids_BHW, cfg)
  logits_BLK = model.apply({"params": params}, inputs_BL, deterministic=deterministic,
                           rngs=_rngs(rng, deterministic))
  return causal_lm.loss(logits_BLK, targets_BL,
                        _pixel_weights(batch, targets_BL.shape))


def axial_lm_task(model: nn.Module, params: Any, batch: Batch, rng: jax.Array | None,
                  deterministic: bool, *, levels: int = 4) -> tuple[jax.Array, Metrics]:
  """Axial Transformer: autoregressive pixels in raster order (causal axial masks).

  Same batch, options and metrics as :func:`image_lm_task`; the model is an
  ``AxialTransformer`` mapping ids ``[B, H, W]`` to logits ``[B, H, W, K]`` where the
  logits at a pixel see only earlier pixels, so the targets are the ids themselves.
  """
  cfg = model.config
  ids_BHW = quantize_images(batch["image"], levels=levels,
                            num_clusters=cfg.num_clusters)
  logits_BHWK = model.apply({"params": params}, ids_BHW, deterministic=deterministic,
                            rngs=_rngs(rng, deterministic))
  b, h, w, k = logits_BHWK.shape
  targets_BL = ids_BHW.reshape(b, h * w)
  return causal_lm.loss(logits_BHWK.reshape(b, h * w, k), targets_BL,
                        _pixel_weights(batch, targets_BL.shape))


TASKS = {
    "masked_lm": masked_lm_task,
    "seq2seq": seq2seq_task,
    "classification": classification_task,
    "image_lm": image_lm_task,
    "axial_lm": axial_lm_task,
}

# task -> extra-eval factory ``(config, *, model, tokenizer, mesh, rules) ->
# ((params, host eval batches) -> metrics) | None``; see tasks.get_extra_eval.
EXTRA_EVALS = {
    "seq2seq": seq2seq_eval.make_bleu_eval,
}
