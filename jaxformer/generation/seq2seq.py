"""Generation with encoder-decoder models: encode once, then decode with the KV cache.

``generate_seq2seq`` samples (or greedily decodes) target sequences that start with
``bos_id``; the decoder's self attention keeps a cache, its cross attention reads the
encoder output computed once. The loop is ``decode.sample_loop``: stops per row at
``eos_id``, pads with ``pad_id``, seeded per row.

The model must follow ``jaxformer.models.EncoderDecoder``: ``encode(source_BS,
source_mask)`` -> ``encoded_BSD``; ``decode(encoded_BSD, target_inputs_BT, source_mask,
target_positions=...)`` -> logits; a ``config.block.decode`` field switching on the
cache.
"""

from __future__ import annotations

import functools
import numbers
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxformer.generation import decode as dec_lib

Array = jax.Array
PyTree = Any


def _check_source(source_BS: Any, source_mask: Any) -> None:
  if getattr(source_BS, "ndim", None) != 2 or source_BS.shape[1] < 1:
    raise ValueError(f"source_BS must be int [batch, length >= 1]; got shape "
                     f"{getattr(source_BS, 'shape', None)}")
  if not jnp.issubdtype(source_BS.dtype, jnp.integer):
    raise TypeError(f"source_BS must hold integer token ids; got dtype {source_BS.dtype}")
  if source_mask is not None and getattr(source_mask, "shape", None) != source_BS.shape:
    raise ValueError(f"source_mask must have source_BS's shape {source_BS.shape}; got "
                     f"{getattr(source_mask, 'shape', None)}")


def encoder_decoder_step_fn(model: nn.Module, params: PyTree, encoded_BSD: Array,
                            source_mask_BS: Array | None) -> dec_lib.StepFn:
  """A ``StepFn`` for ``model.decode`` (decode mode) against a fixed encoder output."""
  variables = dec_lib.as_variables(params)

  def step(cache, tokens_BL, positions_BL):
    logits_BLV, mutated = model.apply(
        {**variables, "cache": cache}, encoded_BSD, tokens_BL, source_mask_BS,
        target_positions=positions_BL, method="decode", mutable=["cache"])
    return logits_BLV[:, -1, :].astype(jnp.float32), mutated["cache"]

  return step


def encode_and_init(model: nn.Module, params: PyTree, source_BS: Array,
                    source_mask_BS: Array | None,
                    target_length: int) -> tuple[nn.Module, Array, PyTree]:
  """Runs the encoder once and sizes the decoder cache for ``target_length`` tokens.

  Returns:
    ``(decoding_model, encoded_BSD, cache)``.
  """
  variables = dec_lib.as_variables(params)
  encoded_BSD = model.apply(variables, source_BS, source_mask_BS, method="encode")
  decoding = dec_lib.decoding_module(model)
  batch = source_BS.shape[0]
  cache = dec_lib.init_cache(decoding, source_BS,
                             jnp.zeros((batch, target_length), jnp.int32), source_mask_BS)
  return decoding, encoded_BSD, cache


@functools.partial(jax.jit, static_argnames=(
    "model", "max_new_tokens", "top_k", "bos_id", "eos_id", "pad_id", "greedy",
    "use_top_p"))
def _generate_seq2seq_jit(model, params, source_BS, source_mask_BS, rng, temperature,
                          top_p, *, max_new_tokens, top_k, bos_id, eos_id, pad_id, greedy,
                          use_top_p):
  batch = source_BS.shape[0]
  decoding, encoded_BSD, cache = encode_and_init(model, params, source_BS, source_mask_BS,
                                                 max_new_tokens)
  step = encoder_decoder_step_fn(decoding, params, encoded_BSD, source_mask_BS)
  prompt_B1 = jnp.full((batch, 1), bos_id, jnp.int32)
  return dec_lib.sample_loop(
      step, cache, prompt_B1, jnp.ones((batch,), jnp.int32), max_new_tokens=max_new_tokens,
      rng=rng, temperature=temperature, top_k=top_k, top_p=top_p if use_top_p else None,
      eos_id=eos_id, pad_id=pad_id, greedy=greedy)


def generate_seq2seq(model: nn.Module, params: PyTree, source_BS: Array, *,
                     max_new_tokens: int, bos_id: int, rng: Array | None = None,
                     source_mask: Array | None = None, temperature: float | Array = 1.0,
                     top_k: int | None = None, top_p: float | Array | None = None,
                     eos_id: int | None = None, pad_id: int = 0) -> tuple[Array, Array]:
  """Decodes targets for a batch of sources with an encoder-decoder model.

  Args:
    model: an ``EncoderDecoder`` (training mode; decoding is switched on here).
    params: its ``params`` collection (or ``{'params': ...}``).
    source_BS: int [batch, S] source tokens.
    max_new_tokens: >= 1 target tokens after BOS (at most the model's ``max_len``: BOS
      and all but the last token are fed to the decoder).
    bos_id: the decoder's start token.
    rng: one PRNG key or one per row; None only for greedy (``temperature=0``).
    source_mask: bool [batch, S], True at real source tokens (None: all real).
    temperature, top_k, top_p: see ``sampling.sample_token``; temperature 0 is greedy.
    eos_id: a row stops after emitting it; None = never.
    pad_id: fills each row after its end.
  Returns:
    ``(tokens_BT, lengths_B)``: int32 ``[batch, 1 + max_new_tokens]`` starting with BOS,
    and the valid length of each row (BOS and EOS included).
  """
  _check_source(source_BS, source_mask)
  if isinstance(bos_id, bool) or not isinstance(bos_id, numbers.Integral):
    raise TypeError(f"bos_id must be a Python int; got {bos_id!r}")
  dec_lib._check_generate_args(  # pylint: disable=protected-access
      jnp.zeros((source_BS.shape[0], 1), jnp.int32), None, max_new_tokens, temperature,
      top_k, top_p, eos_id, pad_id)
  dec_lib._check_max_len(model, max_new_tokens)  # pylint: disable=protected-access
  greedy = dec_lib._is_greedy(temperature)  # pylint: disable=protected-access
  if rng is None:
    if not greedy:
      raise ValueError("rng is required unless temperature == 0 (greedy decoding)")
    rng = jax.random.key(0)
  if source_mask is None:
    source_mask = jnp.ones(source_BS.shape, jnp.bool_)
  return _generate_seq2seq_jit(
      model, params, jnp.asarray(source_BS), jnp.asarray(source_mask, jnp.bool_), rng,
      jnp.asarray(1.0 if greedy else temperature, jnp.float32),
      jnp.asarray(1.0 if top_p is None else top_p, jnp.float32),
      max_new_tokens=max_new_tokens, top_k=top_k, bos_id=bos_id, eos_id=eos_id,
      pad_id=pad_id, greedy=greedy, use_top_p=top_p is not None)
