"""Causal language modelling: packed text, next-token loss, bits per byte, a sample."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxformer.data import local_text
from jaxformer.data import pipeline
from jaxformer.data import token_windows
from jaxformer.data import tokenizers as tok_lib
from jaxformer.generation import decode as generation
from jaxformer.objectives import causal_lm
from jaxformer.tasks import base


def unigram_bits(batches: list[Mapping[str, np.ndarray]]) -> float:
  """The unigram baseline, in bits per target token, of LM eval batches.

  The entropy of the weighted empirical distribution of the batches' ``targets``: the
  cross-entropy the best unigram model (one fitted on these very batches) would reach,
  so a trained model's ``eval_bits_per_byte`` should fall clearly below it.
  """
  targets = np.concatenate([np.asarray(b["targets"]).reshape(-1) for b in batches])
  weights = np.concatenate([np.asarray(b["weights"], np.float64).reshape(-1)
                            if "weights" in b else np.ones(np.size(b["targets"]))
                            for b in batches])
  counts = np.bincount(targets, weights=weights)
  p = counts[counts > 0] / counts.sum()
  return float(-(p * np.log2(p)).sum())


class CausalLM(base.Task):
  """Next-token prediction on packed documents (a decoder-only LM such as GPT).

  Batches: ``inputs``/``targets``/``segment_ids``/``positions``/``weights`` ``[B, L]``
  (:func:`jaxformer.data.pipeline.lm_pipeline`; ``data.pack``); one text (a single
  file's split, ``data.source="text_files"``) is read as nanoGPT reads it instead:
  one token stream, each row a random contiguous window, only ``inputs``/``targets``
  (:mod:`jaxformer.data.token_windows`). Model:
  ``(inputs_BL, segment_ids, positions) -> logits_BLV``. Eval adds, for a byte
  tokenizer, ``bits_per_byte`` and the ``unigram_bits_per_byte`` baseline.
  """

  name = "causal_lm"

  def __init__(self, *args, **kwargs):
    super().__init__(*args, **kwargs)
    self._unigram: float | None = None
    self._streams: dict[bool, np.ndarray] = {}   # train? -> one text's tokens

  def batches(self, *, batch_size: int, seed: int, train: bool) -> Any:
    source = self.source(train)
    if isinstance(source, local_text.TextWindowsSource):
      # One text: a single token stream, random windows (eval: seed 0, fixed).
      if train not in self._streams:
        self._streams[train] = self.tokenizer.encode_array(source.text)
      return token_windows.window_pipeline(
          self._streams[train], seq_len=self.data["seq_len"], batch_size=batch_size,
          seed=seed if train else 0, shard_index=jax.process_index(),
          shard_count=jax.process_count(),
          prefetch=self.data.get("prefetch", 0) if train else 0, name=repr(source))
    # Eval: one dense stream in a fixed order, repeating (every process can always
    # take the same number of batches).
    return pipeline.lm_pipeline(
        source, self.tokenizer, seq_len=self.data["seq_len"],
        batch_size=batch_size, seed=seed if train else 0,
        shard_index=jax.process_index(), shard_count=jax.process_count(),
        pack=self.data.get("pack", True), shuffle=train,
        streams=None if train else 1,
        prefetch=self.data.get("prefetch", 0) if train else 0)

  def model_inputs(self, batch: base.Batch) -> tuple[Any, ...]:
    return batch["inputs"], batch.get("segment_ids"), batch.get("positions")

  def loss(self, model: nn.Module, params: Any, batch: base.Batch,
           rng: jax.Array | None, deterministic: bool
           ) -> tuple[jax.Array, base.Metrics]:
    logits_BLV = self.apply(model, params, batch, rng, deterministic)
    return causal_lm.loss(logits_BLV, batch["targets"], batch.get("weights"))

  def eval_metrics(self, params: Any, batches: list[base.Batch],
                   metrics: Mapping[str, float],
                   runtime: base.Runtime) -> dict[str, float]:
    if not isinstance(self.tokenizer, tok_lib.ByteTokenizer) or "nll" not in metrics:
      return {}
    if self._unigram is None:  # the eval batches are the same at every eval
      self._unigram = unigram_bits(batches)
    return {"bits_per_byte": metrics["nll"] / math.log(2.0),
            "unigram_bits_per_byte": self._unigram}

  def sample(self, params: Any, runtime: base.Runtime,
             train: Mapping[str, Any]) -> str | None:
    if train.get("sample_tokens", 0) <= 0 or self.tokenizer is None:
      return None
    max_len = getattr(self.model_config, "max_len", self.data["seq_len"])
    return sample_text(runtime, params, self.tokenizer,
                       prompt=train.get("sample_prompt", ""),
                       max_new_tokens=train["sample_tokens"],
                       temperature=train.get("sample_temperature", 1.0),
                       seed=train["seed"], max_len=max_len)


def sample_text(runtime: base.Runtime, params: Any, tokenizer: tok_lib.Tokenizer, *,
                prompt: str, max_new_tokens: int, temperature: float, seed: int,
                max_len: int) -> str:
  """A continuation of ``prompt`` generated with the model's KV cache."""
  ids = [tokenizer.bos_id] + tokenizer.encode(prompt)
  new = min(max_new_tokens, max_len - len(ids))
  if new < 1:
    return prompt
  tokens_BT, lengths_B = generation.generate(
      runtime.model, params, jnp.asarray([ids], jnp.int32), max_new_tokens=new,
      rng=jax.random.key(seed), temperature=temperature,
      eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id)
  tokens_BT, lengths_B = runtime.to_host((tokens_BT, lengths_B))
  return tokenizer.decode(np.asarray(tokens_BT[0, 1:int(lengths_B[0])]).tolist())
