"""Causal language modelling: packed text, next-token loss, bits per byte, a sample."""

from __future__ import annotations

import dataclasses
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
from jaxformer.data.config import DataConfig
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


@dataclasses.dataclass(frozen=True, kw_only=True)
class LMData(DataConfig):
  """``data`` of language modelling: ``pack`` several documents per row (segment ids)
  or one chunk per row; ``seq_len`` tokens per row."""

  seq_len: int = dataclasses.field()  # required (the base class has a default)
  pack: bool = True


class CausalLM(base.Task):
  """Next-token prediction on packed documents (a decoder-only LM such as GPT).

  Batches: ``inputs``/``targets``/``segment_ids``/``positions``/``weights`` ``[B, L]``
  (:func:`jaxformer.data.pipeline.read_lm`; ``data.pack``); one text (a single
  file's split, ``data.source="text_files"``) is read as nanoGPT reads it instead:
  one token stream, each row a random contiguous window, only ``inputs``/``targets``
  (:mod:`jaxformer.data.token_windows`). Model:
  ``(inputs_BL, segment_ids, positions) -> logits_BLV``. Eval adds, for a byte
  tokenizer, ``bits_per_byte`` and the ``unigram_bits_per_byte`` baseline. Options:
  a text sample at the end of the run, ``sample_tokens`` (0: none) continuing
  ``sample_prompt`` at ``sample_temperature``.
  """

  @dataclasses.dataclass(frozen=True, kw_only=True)
  class Options:
    sample_tokens: int = 0
    sample_prompt: str = ""
    sample_temperature: float = 1.0

  name = "causal_lm"
  Data = LMData

  def __init__(self, *args, **kwargs):
    super().__init__(*args, **kwargs)
    self._unigram: float | None = None
    self._streams: dict[bool, np.ndarray] = {}   # train? -> one text's tokens

  def batches(self, *, batch_size: int, seed: int, train: bool) -> Any:
    source = self.source(train)
    options = self.read_options(batch_size=batch_size, seed=seed if train else 0,
                                train=train)
    if isinstance(source, local_text.TextWindowsSource):
      # One text: a single token stream, random windows (eval: seed 0, fixed).
      if train not in self._streams:
        self._streams[train] = self.tokenizer.encode_array(source.text)
      return token_windows.window_pipeline(
          self._streams[train], seq_len=self.data.seq_len, batch_size=batch_size,
          seed=options.seed, shard_index=options.shard_index,
          shard_count=options.shard_count, prefetch=options.prefetch,
          name=repr(source))
    # Eval: one dense stream in a fixed order, repeating (every process can always
    # take the same number of batches).
    return pipeline.read_lm(source, self.tokenizer, options,
                            seq_len=self.data.seq_len, pack=self.data.pack,
                            text_key=self.data.text_key,
                            streams=None if train else 1)

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
             seed: int) -> tuple[str, str] | None:
    opts = self.options
    if opts.sample_tokens <= 0 or self.tokenizer is None:
      return None
    max_len = getattr(self.model_config, "max_len", self.data.seq_len)
    text = sample_text(runtime, params, self.tokenizer, prompt=opts.sample_prompt,
                       max_new_tokens=opts.sample_tokens,
                       temperature=opts.sample_temperature, seed=seed,
                       max_len=max_len)
    return text, (f"sample (prompt {opts.sample_prompt!r}, temperature "
                  f"{opts.sample_temperature})")


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
