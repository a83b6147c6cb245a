"""The tasks (masked LM ± NSP, seq2seq, classification, image LMs), their model inputs
and the task registry (options, init).

Most tests use a stand-in model whose ``apply`` returns logits held in ``params``, so
the task's loss is checked against a float64 NumPy reference (and its gradient shows
which positions count) without compiling a transformer.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

from jaxformer.data import tokenizers
from jaxformer.models import bert as bert_lib
from jaxformer.models import image_gpt
from jaxformer.models import axial_transformer
from jaxformer import tasks
from jaxformer.objectives import masked_lm
from jaxformer.tasks import image_lm

TOK = tokenizers.CharTokenizer("abcdefgh")  # 7 specials + 8 chars = 15 ids
B, L, V = 3, 10, 16


@dataclasses.dataclass
class FixedLogits:
  """A stand-in model: ``apply`` returns ``params["logits"]`` (dict outputs as BERT)."""

  outputs: tuple[str, ...] = ()   # () -> a bare array; else dict keys -> params[key]
  config: Any = None
  calls: list = dataclasses.field(default_factory=list)

  def apply(self, variables, *args, **kwargs):
    self.calls.append((args, kwargs))
    params = variables["params"]
    if not self.outputs:
      return params["logits"]
    return {k: params[k] for k in self.outputs}


def _task(name, options=None, cfg=None):
  return tasks.TASKS[name]({}, options, tokenizer=TOK, model_config=cfg)


def _ce64(logits, targets, weights, eps=0.0):
  logits = np.asarray(logits, np.float64)
  logp = logits - logits.max(-1, keepdims=True)
  logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
  nll = -np.take_along_axis(logp, np.asarray(targets)[..., None], -1)[..., 0]
  smooth = -logp.mean(-1)
  per = (1 - eps) * nll + eps * smooth
  w = np.asarray(weights, np.float64)
  return (per * w).sum() / w.sum()


def _text_batch(seed=0):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(TOK.cls_id + 3, TOK.vocab_size, (B, L)).astype(np.int32)
  tokens[:, 0] = TOK.cls_id
  tokens[:, -2:] = TOK.pad_id
  mask = tokens != TOK.pad_id
  return {"inputs": jnp.asarray(tokens), "inputs_mask": jnp.asarray(mask),
          "token_types": jnp.zeros((B, L), jnp.int32),
          "nsp_label": jnp.asarray([0, 1, 1], jnp.int32),
          "weights": jnp.ones((B,), jnp.float32)}


class MaskedLMTaskTest(parameterized.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_loss_counts_only_chosen_positions(self):
    batch = _text_batch()
    logits = jax.random.normal(jax.random.key(1), (B, L, V))
    model = FixedLogits(outputs=("mlm_logits",))
    rng = jax.random.key(7)
    task = _task("masked_lm", {"mask_rate": 0.5})

    def loss_fn(lg):
      return task(model, {"mlm_logits": lg}, batch, rng, False)

    (loss, metrics), grad = self.variant(jax.value_and_grad(loss_fn, has_aux=True))(
        logits)
    mask_key, _ = jax.random.split(rng)
    _, targets, chosen = masked_lm.mask_tokens(
        mask_key, batch["inputs"], vocab_size=TOK.vocab_size, mask_id=TOK.mask_id,
        special_ids=TOK.special_ids, mask_rate=0.5)
    chosen = np.asarray(chosen)
    self.assertGreater(chosen.sum(), 0)
    self.assertLess(chosen.sum(), np.asarray(batch["inputs_mask"]).sum())
    # Never special tokens ([CLS], [PAD]).
    self.assertEqual(chosen[:, 0].sum() + chosen[:, -2:].sum(), 0)
    np.testing.assert_allclose(loss, _ce64(logits, targets, chosen), rtol=1e-5)
    self.assertEqual(float(metrics["num_tokens"]), chosen.sum())
    # The gradient reaches exactly the chosen positions.
    touched = np.abs(np.asarray(grad)).sum(-1) > 0
    np.testing.assert_array_equal(touched, chosen > 0)

  def test_inputs_are_masked_and_eval_masks_are_fixed(self):
    batch = _text_batch()
    model = FixedLogits(outputs=("mlm_logits",))
    params = {"mlm_logits": jnp.zeros((B, L, V))}
    task = _task("masked_lm", {"mask_rate": 0.5, "replace_mask": 1.0,
                               "replace_random": 0.0})
    task(model, params, batch, None, True)
    task(model, params, batch, None, True)
    task(model, params, batch, jax.random.key(3), False)
    (in_a, _, mask_a), _ = model.calls[0]
    (in_b, _, _), _ = model.calls[1]
    (in_c, _, _), _ = model.calls[2]
    np.testing.assert_array_equal(in_a, in_b)             # eval: same masks
    self.assertFalse(np.array_equal(in_a, in_c))          # train: the step's key
    changed = np.asarray(in_a) != np.asarray(batch["inputs"])
    self.assertTrue(changed.any())
    np.testing.assert_array_equal(np.asarray(in_a)[changed], TOK.mask_id)
    np.testing.assert_array_equal(mask_a, batch["inputs_mask"])

  def test_nsp_adds_its_loss(self):
    batch = _text_batch()
    params = {"mlm_logits": jax.random.normal(jax.random.key(1), (B, L, V)),
              "nsp_logits": jnp.asarray([[2.0, -1.0], [0.5, 0.1], [-1.0, 1.0]])}
    model = FixedLogits(outputs=("mlm_logits", "nsp_logits"))
    plain = _task("masked_lm", None)
    with_nsp = _task("masked_lm", {"nsp": True})
    mlm_loss, _ = plain(model, params, batch, None, True)
    loss, metrics = with_nsp(model, params, batch, None, True)
    nsp_ref = _ce64(params["nsp_logits"], batch["nsp_label"], np.ones(B))
    np.testing.assert_allclose(metrics["nsp_loss"], nsp_ref, rtol=1e-5)
    np.testing.assert_allclose(loss, mlm_loss + nsp_ref, rtol=1e-5)
    np.testing.assert_allclose(metrics["nsp_accuracy"], 2 / 3, rtol=1e-6)
    with self.assertRaisesRegex(ValueError, "nsp_head"):
      with_nsp(FixedLogits(outputs=("mlm_logits",)), params, batch, None, True)


class OtherTasksTest(parameterized.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_seq2seq_label_smoothing(self):
    rng = np.random.default_rng(0)
    targets = rng.integers(0, V, (B, L)).astype(np.int32)
    weights = (np.arange(L)[None, :] < np.asarray([[10], [6], [3]])).astype(np.float32)
    batch = {"inputs": jnp.zeros((B, 5), jnp.int32),
             "inputs_mask": jnp.ones((B, 5), bool),
             "decoder_inputs": jnp.zeros((B, L), jnp.int32),
             "targets": jnp.asarray(targets), "weights": jnp.asarray(weights)}
    logits = jax.random.normal(jax.random.key(2), (B, L, V))
    task = _task("seq2seq", {"label_smoothing": 0.1})
    loss, metrics = self.variant(
        lambda lg: task(FixedLogits(), {"logits": lg}, batch, None, True))(logits)
    np.testing.assert_allclose(loss, _ce64(logits, targets, weights, 0.1), rtol=1e-5)
    np.testing.assert_allclose(metrics["nll"], _ce64(logits, targets, weights),
                               rtol=1e-5)
    self.assertEqual(float(metrics["num_tokens"]), weights.sum())

  @parameterized.parameters("text", "image")
  def test_classification_counts_real_examples(self, kind):
    labels = np.asarray([0, 2, 1], np.int32)
    weights = np.asarray([1.0, 1.0, 0.0], np.float32)  # last row pads the batch
    logits = np.asarray([[2.0, 0.0, -1.0], [0.0, 0.0, 3.0], [5.0, 0.0, 0.0]],
                        np.float32)
    batch = {"labels": jnp.asarray(labels), "weights": jnp.asarray(weights)}
    if kind == "text":
      batch.update(inputs=jnp.zeros((B, 4), jnp.int32),
                   inputs_mask=jnp.ones((B, 4), bool))
      model = FixedLogits(outputs=("logits",))
    else:
      batch["image"] = jnp.zeros((B, 4, 4, 1))
      model = FixedLogits()
    task = _task("classification" if kind == "text" else "image_classification")
    loss, metrics = task(model, {"logits": jnp.asarray(logits)}, batch, None, True)
    np.testing.assert_allclose(loss, _ce64(logits, labels, weights), rtol=1e-5)
    self.assertEqual(float(metrics["num_tokens"]), 2.0)
    self.assertEqual(float(metrics["accuracy"]), 1.0)

  def test_grid_palette_and_quantize(self):
    palette = image_lm.grid_palette(3, 2)
    self.assertEqual(palette.shape, (9, 2))
    np.testing.assert_allclose(palette[5], [1.0, 0.5])     # 5 = 2 + 1 * 3
    images = jnp.asarray([[[[0.1, 0.9], [0.6, 0.3]]]])      # [1, 1, 2, 2]
    ids = image_lm.quantize_images(images, levels=3, num_clusters=9)
    # per channel round(x * 2): (0, 2) -> 0 + 2*3 = 6; (1, 1) -> 1 + 3 = 4
    np.testing.assert_array_equal(ids, [[[6, 4]]])
    with self.assertRaisesRegex(ValueError, "num_clusters"):
      image_lm.quantize_images(images, levels=4, num_clusters=9)

  @chex.variants(with_jit=True, without_jit=True)
  def test_image_lm_predicts_next_pixel(self):
    cfg = image_gpt.image_gpt_tiny(num_clusters=4)            # 4 x 4 images
    images = jax.random.uniform(jax.random.key(0), (2, 4, 4, 1))
    batch = {"image": images, "weights": jnp.asarray([1.0, 0.0])}
    logits = jax.random.normal(jax.random.key(1), (2, 16, 4))
    model = FixedLogits(config=cfg)
    task = _task("image_lm", {"levels": 4}, cfg)
    loss, metrics = self.variant(
        lambda lg: task(model, {"logits": lg}, batch, None, True))(logits)
    ids = np.round(np.asarray(images)[..., 0] * 3).astype(np.int32).reshape(2, 16)
    task(model, {"logits": logits}, batch, None, True)  # un-jitted: inspect inputs
    (inputs,), _ = model.calls[-1]
    np.testing.assert_array_equal(inputs[:, 0], cfg.sos_id)
    np.testing.assert_array_equal(inputs[:, 1:], ids[:, :-1])
    w = np.asarray([[1.0] * 16, [0.0] * 16])
    np.testing.assert_allclose(loss, _ce64(logits, ids, w), rtol=1e-5)
    self.assertEqual(float(metrics["num_tokens"]), 16.0)

  def test_axial_lm_targets_are_the_pixels(self):
    cfg = axial_transformer.axial_tiny(num_clusters=4, num_channels=1)
    images = jax.random.uniform(jax.random.key(0), (2, 4, 4, 1))
    logits = jax.random.normal(jax.random.key(1), (2, 4, 4, 4))
    model = FixedLogits(config=cfg)
    task = _task("axial_lm", {"levels": 4}, cfg)
    loss, _ = task(model, {"logits": logits}, {"image": images}, None, True)
    ids = np.round(np.asarray(images)[..., 0] * 3).astype(np.int32)
    (inputs,), _ = model.calls[-1]
    np.testing.assert_array_equal(inputs, ids)
    np.testing.assert_allclose(
        loss, _ce64(np.asarray(logits).reshape(2, 16, 4), ids.reshape(2, 16),
                    np.ones((2, 16))), rtol=1e-5)


class RegistryTest(parameterized.TestCase):

  def test_task_options_and_names(self):
    self.assertIs(tasks.task_class("causal_lm"), tasks.TASKS["causal_lm"])
    with self.assertRaisesRegex(ValueError, r"\['masking'\].*masked_lm"):
      tasks.check_task({"task": "masked_lm", "task_options": {"masking": 0.1}})
    with self.assertRaisesRegex(ValueError, "not a known task.*masked_lm"):
      tasks.task_class("mlm")
    task = _task("masked_lm", {"nsp": True})
    self.assertEqual(dataclasses.asdict(task.options), dict(
        nsp=True, mask_rate=0.15, replace_mask=0.8, replace_random=0.1))

  def test_init_from_model_inputs_matches_model_init(self):
    cfg = bert_lib.bert_tiny(vocab_size=16, mlm_head=True, num_layers=1)
    model = bert_lib.BERT(cfg)
    batch = jax.tree.map(jnp.asarray, _text_batch())
    task = _task("masked_lm")
    got = model.init(jax.random.key(4), *task.model_inputs(batch))
    want = model.init(jax.random.key(4), batch["inputs"])
    chex.assert_trees_all_equal(got, want)

  def test_causal_lm_model_inputs_and_bits_per_byte(self):
    batch = {"inputs": np.ones((2, 4), np.int32), "targets": np.ones((2, 4), np.int32),
             "weights": np.ones((2, 4), np.float32)}
    data = dict(source="stdlib_text", seq_len=4, batch_size=2, eval_batch_size=2)
    task = tasks.TASKS["causal_lm"](data, None, tokenizer=tokenizers.ByteTokenizer())
    self.assertEqual(task.model_inputs(batch)[1:], (None, None))
    extra = task.eval_metrics(None, [batch], {"nll": np.log(2.0)}, None)
    self.assertEqual(extra, {"bits_per_byte": 1.0, "unigram_bits_per_byte": 0.0})
    chars = tasks.TASKS["causal_lm"](data, None, tokenizer=TOK)
    self.assertEqual(chars.eval_metrics(None, [batch], {"nll": 1.0}, None), {})


def test_masked_lm_on_packed_text_and_build_task():
  data = dict(source="stdlib_text", pipeline="lm", seq_len=16,
              train_split="validation", batch_size=2, eval_batch_size=2)
  config = {"task": "masked_lm", "task_options": {"mask_rate": 0.2}, "data": data}
  task = tasks.build_task(config, tokenizer=tokenizers.ByteTokenizer())
  assert isinstance(task, tasks.TASKS["masked_lm"]) and task.options.mask_rate == 0.2
  batch = next(task.batches(batch_size=2, seed=0, train=True))
  inputs, token_types, mask = task.model_inputs(batch)
  assert inputs.shape == (2, 16) and token_types is None
  np.testing.assert_array_equal(mask, batch["segment_ids"] > 0)
  assert task.example_length() == 16
