"""Perplexity of a pretrained (Hugging Face) causal LM on a text file.

  python -m experiments.perplexity --pretrained=path/to/gpt2 --text=path/to/file.txt

The file is tokenized whole and cut into consecutive windows of the model's context
(``max_len``, 1024 for GPT-2); each window scores its tokens after the first, so every
token but the first of each window is predicted with the window before it as context:
``perplexity = exp(sum of -log p / number of predicted tokens)``. Prints the perplexity
and the token count. Everything it does is :func:`perplexity`. A bad input prints one
``error:`` line and exits with status 1 (``--verbose``: the traceback too).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from absl import app
from absl import flags

from experiments import command_line
from jaxformer.data import local_text
from jaxformer.pretrained import from_huggingface
from jaxformer.pretrained import spec_of
from jaxformer.pretrained.tokenizers import load_tokenizer



@functools.partial(jax.jit, static_argnames=("model",))
def _window_nll(model, params, tokens_1L, weights_1L):
  """Summed -log p of tokens[1:] given the prefix, weighted (float32 scalar)."""
  logits = model.apply({"params": params}, tokens_1L)[:, :-1]
  logp = jax.nn.log_softmax(logits.astype(jnp.float32))
  nll = -jnp.take_along_axis(logp, tokens_1L[:, 1:, None], axis=-1)[..., 0]
  return (nll * weights_1L[:, 1:]).sum()


def perplexity(directory: str, text: str, *, window: int | None = None,
               model_and_params=None) -> tuple[float, int]:
  """``(perplexity, predicted tokens)`` of ``text`` under the model in ``directory``."""
  spec = spec_of(directory)
  command_line.require_causal_lm(spec.model, f"{spec.hf_class} ({spec.family})",
                                 f"perplexity under {directory}")
  model, params = model_and_params or from_huggingface(directory)
  ids = load_tokenizer(directory).encode(text)
  window = window or model.config.max_len
  if not 2 <= window <= model.config.max_len:
    raise ValueError(f"window={window} must lie in [2, max_len={model.config.max_len}]")
  if len(ids) < 2:
    raise ValueError(f"the text has {len(ids)} token(s); at least 2 are needed")
  total, count = 0.0, 0
  for start in range(0, len(ids), window):
    chunk = ids[start:start + window]
    if len(chunk) < 2:
      break
    tokens = np.zeros((1, window), np.int32)   # one shape: one compilation
    weights = np.zeros((1, window), np.float32)
    tokens[0, :len(chunk)] = chunk
    weights[0, :len(chunk)] = 1.0
    total += float(_window_nll(model, params, tokens, weights))
    count += len(chunk) - 1
  return math.exp(total / count), count


def _define_flags() -> None:
  """Command-line flags, defined only when run as a script (the module imports cleanly)."""
  flags.DEFINE_string("pretrained", None, "Hugging Face GPT-2 directory.")
  flags.DEFINE_string("text", None, "UTF-8 text file to score.")
  flags.DEFINE_integer("window", None, "Tokens per window (default max_len).")
  flags.mark_flags_as_required(["pretrained", "text"])
  command_line.define_verbose()


@command_line.user_errors
def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  text = local_text.read_text(flags.FLAGS.text,
                              how="--text must be a UTF-8 text file")
  ppl, count = perplexity(flags.FLAGS.pretrained, text, window=flags.FLAGS.window)
  print(f"perplexity {ppl:.4f} over {count} predicted tokens ({flags.FLAGS.text})")


if __name__ == "__main__":
  _define_flags()
  app.run(main, flags_parser=command_line.parse_flags)
