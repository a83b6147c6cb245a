"""Zero-shot classification by prompting a language model.

Each text is put into a template (``"Review: {text}\\nSentiment:"``) and each label is
scored by the model's log-probability of its verbalizer (``{0: " negative", 1:
" positive"}``) as the continuation of the prompt:

    score(text, label) = sum_i log p(v_i | bos, prompt, v_<i)

with one full (cache-free, causal) forward per (text, label) sequence, batched and
right-padded (causal attention means padding after a sequence cannot change its scores).
The predicted label is the arg-max score; ties go to the label listed first.

Tokenisation: the prompt and the verbalizer are encoded separately and concatenated
(``encode(prompt) + encode(word)``), which is exact for byte/char tokenizers; for
sub-word tokenizers it is the usual convention (and why verbalizers start with a space).
"""

from __future__ import annotations

import functools
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from jaxformer.generation import metrics
from jaxformer.generation.decode import as_variables

Array = jax.Array
PyTree = Any


@functools.partial(jax.jit, static_argnames=("model",))
def _score_batch(model: nn.Module, variables: PyTree, inputs_BL: Array,
                 weights_BL: Array) -> Array:
  """Sum of log p(inputs[:, i]) over positions i with weight 1 (weights[:, 0] is unused)."""
  logits_BLV = model.apply(variables, inputs_BL)
  return metrics.sequence_log_probs(logits_BLV[:, :-1], inputs_BL[:, 1:], weights_BL[:, 1:])


def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


class PromptClassifier:
  """Classifies texts with a causal LM, a prompt template and a verbalizer.

  Args:
    model: a decoder-only Flax module mapping ``inputs_BL`` to logits ``[B, L, V]``
      (training mode, no cache).
    params: its ``params`` collection (or ``{'params': ...}``).
    tokenizer: has ``encode(str) -> list[int]`` (and ``bos_id`` when ``add_bos``).
    template: a ``str.format`` template with one ``{text}`` field.
    verbalizer: maps each label to the string the model should continue with.
    batch_size: sequences per forward pass (the last batch is padded to this size).
    add_bos: prepend ``tokenizer.bos_id`` (the data pipeline starts documents with BOS).
    max_length: if set, prompts are truncated from the left (after BOS) so that the
      sequence with the longest verbalizer fits; every label is then scored after the
      same prompt tokens. Sequences are padded to a multiple of ``pad_multiple`` up to
      it.
    length_normalize: score by the mean instead of the sum of the verbalizer's token
      log-probs (matters only for verbalizers of different lengths).
    pad_multiple: round padded lengths up to this multiple (fewer recompilations).
  """

  def __init__(self, model: nn.Module, params: PyTree, tokenizer: Any, template: str,
               verbalizer: Mapping[Hashable, str], *, batch_size: int = 32,
               add_bos: bool = True, max_length: int | None = None,
               length_normalize: bool = False, pad_multiple: int = 16):
    if not isinstance(template, str) or "{text}" not in template:
      raise ValueError(f"template must be a str containing '{{text}}'; got {template!r}")
    try:
      template.format(text="")
    except (KeyError, IndexError, ValueError) as e:
      raise ValueError(f"template {template!r} must have exactly one field, {{text}}; "
                       f"formatting failed with {e!r}") from e
    if not isinstance(verbalizer, Mapping) or len(verbalizer) < 2:
      raise ValueError(f"verbalizer must map >= 2 labels to strings; got {verbalizer!r}")
    self.labels = list(verbalizer)
    self.verbalizer_ids = []
    for label, word in verbalizer.items():
      if not isinstance(word, str):
        raise TypeError(f"verbalizer[{label!r}] must be a str; got {word!r}")
      ids = list(tokenizer.encode(word))
      if not ids:
        raise ValueError(f"verbalizer[{label!r}] = {word!r} encodes to no tokens")
      self.verbalizer_ids.append(ids)
    if batch_size < 1:
      raise ValueError(f"batch_size must be >= 1; got {batch_size}")
    longest = max(len(v) for v in self.verbalizer_ids)
    if max_length is not None and max_length < longest + 1 + int(add_bos):
      raise ValueError(f"max_length={max_length} cannot hold BOS, one prompt token and the "
                       f"longest verbalizer ({longest} tokens)")
    if add_bos and getattr(tokenizer, "bos_id", None) is None:
      raise ValueError("add_bos=True needs a tokenizer with a bos_id")
    self.model = model
    self.variables = as_variables(params)
    self.tokenizer = tokenizer
    self.template = template
    self.batch_size = batch_size
    self.add_bos = add_bos
    self.max_length = max_length
    self.length_normalize = length_normalize
    self.pad_multiple = pad_multiple
    self.pad_id = int(getattr(tokenizer, "pad_id", 0) or 0)

  def _prompt_ids(self, text: str) -> list[int]:
    ids = list(self.tokenizer.encode(self.template.format(text=text)))
    return ([int(self.tokenizer.bos_id)] if self.add_bos else []) + ids

  def sequences(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """The scored sequences: ``inputs`` int32 and ``weights`` float32, ``[N * C, L]``.

    Row ``n * C + c`` is text ``n`` followed by label ``c``'s verbalizer; ``weights`` is 1
    at the verbalizer's tokens.
    """
    rows = []
    longest = max(len(v) for v in self.verbalizer_ids)
    bos = int(self.add_bos)
    for text in texts:
      prompt = self._prompt_ids(text)
      # One cut for every label (the longest verbalizer's), so that each label's score
      # conditions on exactly the same prompt tokens.
      if self.max_length is not None and len(prompt) + longest > self.max_length:
        keep = self.max_length - longest - bos
        body = prompt[bos:]
        prompt = prompt[:bos] + body[len(body) - keep:]
      for verb in self.verbalizer_ids:
        rows.append((prompt, verb))
    length = max(len(p) + len(v) for p, v in rows)
    length = _round_up(length, self.pad_multiple)
    if self.max_length is not None:
      length = min(length, self.max_length)
    inputs = np.full((len(rows), length), self.pad_id, np.int32)
    weights = np.zeros((len(rows), length), np.float32)
    for i, (p, v) in enumerate(rows):
      inputs[i, :len(p) + len(v)] = p + v
      weights[i, len(p):len(p) + len(v)] = 1.0
    return inputs, weights

  def score(self, texts: Sequence[str]) -> np.ndarray:
    """Log-probability of each label's verbalizer after each prompt.

    Args:
      texts: N strings.
    Returns:
      float32 ``[N, C]`` in the order of ``self.labels`` (mean per token if
      ``length_normalize``).
    """
    if isinstance(texts, str):
      raise TypeError("texts must be a sequence of strings, not a single str")
    texts = list(texts)
    if not texts:
      return np.zeros((0, len(self.labels)), np.float32)
    inputs, weights = self.sequences(texts)
    n = inputs.shape[0]
    total = _round_up(n, self.batch_size)
    inputs = np.pad(inputs, ((0, total - n), (0, 0)), constant_values=self.pad_id)
    weights = np.pad(weights, ((0, total - n), (0, 0)))
    out = []
    for start in range(0, total, self.batch_size):
      sl = slice(start, start + self.batch_size)
      out.append(np.asarray(_score_batch(self.model, self.variables, inputs[sl],
                                         weights[sl])))
    scores = np.concatenate(out)[:n]
    if self.length_normalize:
      scores = scores / weights[:n].sum(-1)
    return scores.reshape(len(texts), len(self.labels)).astype(np.float32)

  def predict(self, texts: Sequence[str]) -> list[Hashable]:
    """The arg-max label of each text (ties: the label listed first in the verbalizer)."""
    idx = np.argmax(self.score(texts), axis=-1)
    return [self.labels[i] for i in idx]

  def evaluate(self, texts: Sequence[str], labels: Sequence[Hashable]) -> dict[str, float]:
    """Accuracy of ``predict`` against ``labels``.

    Returns:
      ``{"accuracy": float, "num_examples": int}``.
    """
    labels = list(labels)
    if len(labels) != len(texts):
      raise ValueError(f"labels has {len(labels)} entries; texts has {len(texts)}")
    unknown = sorted({repr(l) for l in labels if l not in self.labels})
    if unknown:
      raise ValueError(f"labels {unknown} are not in the verbalizer's labels {self.labels}")
    preds = self.predict(texts)
    correct = sum(int(p == l) for p, l in zip(preds, labels))
    return {"accuracy": correct / max(len(labels), 1), "num_examples": len(labels)}
