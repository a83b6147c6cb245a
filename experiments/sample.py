"""Text from a pretrained (Hugging Face) GPT-2, decoded with the KV cache.

  python -m experiments.sample --pretrained=path/to/gpt2 --prompt="The meaning of" \\
      [--max_new_tokens=50 --temperature=0.8 --top_k=40 --top_p=0.95 --seed=0]

``--pretrained`` is a directory as ``save_pretrained`` writes it (``config.json``,
``model.safetensors``, ``vocab.json`` + ``merges.txt``). ``--temperature=0`` is greedy.
Everything it does is :func:`sample`, importable from a notebook. A bad input prints
one ``error:`` line and exits with status 1 (``--verbose``: the traceback too).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from absl import app
from absl import flags

from experiments import command_line
from jaxformer.generation import decode
from jaxformer.pretrained import from_huggingface
from jaxformer.pretrained import spec_of
from jaxformer.pretrained.tokenizers import load_tokenizer



def sample(directory: str, prompt: str, *, max_new_tokens: int = 50,
           temperature: float = 1.0, top_k: int | None = None,
           top_p: float | None = None, seed: int = 0, model_and_params=None) -> str:
  """``prompt`` and its continuation by the causal LM in ``directory``.

  Stops at ``<|endoftext|>`` or after ``max_new_tokens`` (fewer if the context
  ``max_len`` would be exceeded). ``model_and_params`` reuses a loaded model.
  """
  spec = spec_of(directory)
  command_line.require_causal_lm(spec.model, f"{spec.hf_class} ({spec.family})",
                                 f"sampling from {directory}")
  if max_new_tokens < 1:
    raise ValueError(f"--max_new_tokens={max_new_tokens} must be >= 1")
  model, params = model_and_params or from_huggingface(directory)
  tokenizer = load_tokenizer(directory)
  ids = tokenizer.encode(prompt) or [tokenizer.bos_id]
  room = model.config.max_len + 1 - len(ids)
  if room < 1:
    raise ValueError(f"the prompt has {len(ids)} tokens; the model's context is "
                     f"{model.config.max_len}")
  tokens_BT, lengths_B = decode.generate(
      model, params, jnp.asarray([ids], jnp.int32),
      max_new_tokens=min(max_new_tokens, room), rng=jax.random.key(seed),
      temperature=temperature, top_k=top_k, top_p=top_p, eos_id=tokenizer.eos_id,
      pad_id=tokenizer.pad_id)
  new = np.asarray(tokens_BT)[0, len(ids):int(lengths_B[0])].tolist()
  return prompt + tokenizer.decode(new)


def _define_flags() -> None:
  """Command-line flags, defined only when run as a script (the module imports cleanly)."""
  flags.DEFINE_string("pretrained", None, "Hugging Face GPT-2 directory.")
  flags.DEFINE_string("prompt", "", "Text to continue ('' = from <|endoftext|>).")
  flags.DEFINE_integer("max_new_tokens", 50, "Tokens to generate.")
  flags.DEFINE_float("temperature", 1.0, "Sampling temperature (0: greedy).")
  flags.DEFINE_integer("top_k", None, "Keep the k most likely tokens.")
  flags.DEFINE_float("top_p", None, "Nucleus sampling mass.")
  flags.DEFINE_integer("seed", 0, "PRNG seed.")
  flags.mark_flags_as_required(["pretrained"])
  command_line.define_verbose()


@command_line.user_errors
def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  print(sample(f.pretrained, f.prompt, max_new_tokens=f.max_new_tokens,
               temperature=f.temperature, top_k=f.top_k, top_p=f.top_p,
               seed=f.seed))


if __name__ == "__main__":
  _define_flags()
  app.run(main, flags_parser=command_line.parse_flags)
