"""Autoregressive generation with a key/value cache: decoder-only and encoder-decoder models.

Ragged prompts are **right-padded with per-row lengths** (``prompt_lengths``), not
left-padded. Every row shares one cache index: at step ``t`` each row feeds its token at
position ``t`` and gets the distribution of position ``t + 1``; while ``t + 1`` is still
inside a row's prompt the prompt token is kept (the prefill is "forced decoding"),
afterwards the sampled token is written. A row therefore never attends to padding, positions
need no shifting, and the result for a row equals generating from that prompt alone.
Before the loop, the prefix that every row shares as prompt (the shortest prompt length
minus one, rounded down to a power of two) is fed in one multi-token call.

The loop is one ``lax.while_loop`` over positions that stops as soon as every row has
emitted ``eos_id`` or ``max_new_tokens`` tokens; positions after a row's end hold
``pad_id``. Everything runs under one ``jax.jit`` (the model and the sampling settings
that fix shapes are static; ``temperature`` and ``top_p`` are traced).

Randomness: ``rng`` is one key or one key per row. The token a row samples at position
``t + 1`` uses ``fold_in(row_key, t)``, so the same keys give the same output, and a row
of a batch given key ``k`` matches a single-row call given ``k[None]``. With one key, the
row keys are ``jax.random.split(rng, batch)``.

Models: ``generate`` drives any Flax module that (a) has a ``config.block.decode``
switch (every jaxformer model) or a ``decode`` attribute, (b) keeps its cache in the ``'cache'``
collection, sized by ``init`` with a full-length input, and (c) maps ``(tokens_BL,
positions=...)`` to logits ``[B, L, V]``. ``sample_loop`` takes any step function instead.
"""

from __future__ import annotations

import dataclasses
import functools
import numbers
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxformer.generation import sampling

Array = jax.Array
PyTree = Any

# (cache, tokens_BL, positions_BL) -> (logits_BV of the last position, new_cache)
StepFn = Callable[[PyTree, Array, Array], tuple[Array, PyTree]]


# --------------------------------------------------------------------------------------
# Flax plumbing
# --------------------------------------------------------------------------------------


def decoding_module(model: nn.Module) -> nn.Module:
  """Returns a copy of ``model`` in incremental-decoding mode.

  The switch is the ``decode`` field of the model config's ``block`` (every jaxformer
  model: ``model.config.block.decode``); a bare module with a boolean ``decode``
  attribute (``MultiHeadAttention``, or a user's own) is accepted too.
  """
  cfg = getattr(model, "config", None)
  block = getattr(cfg, "block", None)
  if dataclasses.is_dataclass(cfg) and dataclasses.is_dataclass(block) and any(
      f.name == "decode" for f in dataclasses.fields(block)):
    if block.decode:
      return model
    return model.clone(config=dataclasses.replace(
        cfg, block=dataclasses.replace(block, decode=True)))
  if isinstance(getattr(model, "decode", None), bool):
    return model if model.decode else model.clone(decode=True)
  raise TypeError(
      f"model {type(model).__name__} has no config.block.decode switch and no `decode` "
      "attribute; generation needs a model with a key/value cache")


def as_variables(params: PyTree) -> dict[str, PyTree]:
  """Accepts either the ``params`` collection or a variables dict ``{'params': ...}``."""
  if isinstance(params, dict) or hasattr(params, "keys"):
    if "params" in params:
      return {"params": params["params"]}
  return {"params": params}


def init_cache(model: nn.Module, *init_args: Any, **init_kwargs: Any) -> PyTree:
  """The zero-filled ``'cache'`` collection of ``model`` (in decode mode).

  Uses ``jax.eval_shape`` on ``model.init`` so no parameters are materialised; a cache
  starts at zeros (including its index) as in the Flax examples.

  Args:
    model: a module with decoding on.
    *init_args: the inputs ``init`` is called with; their length sizes the cache (e.g.
      ``jnp.zeros((batch, prompt_len + max_new_tokens), jnp.int32)``).
    **init_kwargs: keyword inputs to ``init``.
  Returns:
    The cache pytree.
  """
  shapes = jax.eval_shape(
      lambda: model.init(jax.random.key(0), *init_args, **init_kwargs))
  if "cache" not in shapes:
    raise TypeError(f"{type(model).__name__}.init in decode mode created no 'cache' "
                    "collection")
  return jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype),
                                nn.meta.unbox(shapes["cache"]))


def flax_step_fn(model: nn.Module, params: PyTree, *, pass_positions: bool = True,
                 method: Callable[..., Any] | str | None = None,
                 **kwargs: Any) -> StepFn:
  """Wraps ``model.apply`` (decode mode) as a ``StepFn``.

  Args:
    model: a module in decode mode.
    params: the ``params`` collection (or ``{'params': ...}``).
    pass_positions: pass ``positions=positions_B1`` to the model.
    method: the module method to apply (e.g. ``"decode"`` of an encoder-decoder).
    **kwargs: fixed extra arguments (e.g. ``encoded=...``).
  """
  variables = as_variables(params)

  def step(cache, tokens_B1, positions_B1):
    extra = dict(kwargs)
    if pass_positions:
      extra["positions"] = positions_B1
    logits_B1V, mutated = model.apply({**variables, "cache": cache}, tokens_B1,
                                      mutable=["cache"], method=method, **extra)
    return logits_B1V[:, -1, :].astype(jnp.float32), mutated["cache"]

  return step


# --------------------------------------------------------------------------------------
# The sampling loop
# --------------------------------------------------------------------------------------


def _row_keys(rng: Array, batch: int) -> Array:
  """One key per row, from one key or a batch of keys."""
  if jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key):
    if rng.ndim == 0:
      return jax.random.split(rng, batch)
    keys = rng
  else:
    if rng.shape == (2,):
      return jax.random.split(rng, batch)
    keys = rng
  if keys.shape[0] != batch or keys.ndim != (1 if jax.dtypes.issubdtype(
      keys.dtype, jax.dtypes.prng_key) else 2):
    raise ValueError(f"rng must be one PRNG key or one key per row ({batch}); got an array "
                     f"of shape {rng.shape}")
  return keys


def sample_loop(step_fn: StepFn, cache: PyTree, prompt_BL: Array, prompt_lengths_B: Array,
                *, max_new_tokens: int, rng: Array, temperature: float | Array = 1.0,
                top_k: int | None = None, top_p: float | Array | None = None,
                eos_id: int | None = None, pad_id: int = 0, greedy: bool = False,
                prefill_len: int = 0) -> tuple[Array, Array]:
  """The jittable core of ``generate`` for any step function (see the module docstring).

  Args:
    step_fn: ``(cache, tokens_BL, positions_BL) -> (logits_BV, cache)``, the logits of
      the last of the ``L`` appended positions (``L = 1`` except for the prefill).
    cache: the initial cache, sized for ``L + max_new_tokens - 1`` positions (the last
      token is never fed back).
    prompt_BL: int [batch, L], right-padded.
    prompt_lengths_B: int [batch], each in ``[1, L]``.
    max_new_tokens: Python int >= 1: the most tokens generated per row.
    rng: one PRNG key or ``batch`` keys.
    temperature, top_k, top_p: see ``sampling.sample_token``.
    eos_id: a row stops after sampling it (it is kept); None = no early stop.
    pad_id: fills each row after its end.
    greedy: arg-max decoding (``temperature`` is ignored).
    prefill_len: Python int; feed the first ``prefill_len`` tokens in one call before the
      loop (needs a cache that accepts multi-token writes, and ``prefill_len <
      min(prompt_lengths)``); 0 = everything token by token.
  Returns:
    ``(tokens_BT, lengths_B)``: int32 ``[batch, L + max_new_tokens]`` and the int32 number
    of valid tokens per row (prompt + generated, EOS included).
  """
  batch, prompt_len = prompt_BL.shape
  total = prompt_len + max_new_tokens
  lengths_B = prompt_lengths_B.astype(jnp.int32)
  pos_T = jnp.arange(total, dtype=jnp.int32)
  prompt_BT = jnp.pad(prompt_BL.astype(jnp.int32), ((0, 0), (0, max_new_tokens)),
                      constant_values=pad_id)
  tokens_BT = jnp.where(pos_T[None, :] < lengths_B[:, None], prompt_BT, pad_id)
  keys_B = _row_keys(rng, batch)

  def sample(t, logits_BV):
    if greedy:
      return sampling.greedy(logits_BV)
    keys_t = jax.vmap(lambda k: jax.random.fold_in(k, t))(keys_B)
    draw = lambda k, l_V: sampling.sample_token(  # noqa: E731
        k, l_V[None, :], temperature=temperature, top_k=top_k, top_p=top_p)[0]
    return jax.vmap(draw)(keys_t, logits_BV)

  def cond(state):
    t, _, done_B, _, _ = state
    return jnp.logical_and(t < total - 1, jnp.logical_not(jnp.all(done_B)))

  def body(state):
    t, tokens_BT, done_B, out_len_B, cache = state
    tok_B1 = jax.lax.dynamic_slice_in_dim(tokens_BT, t, 1, axis=1)
    positions_B1 = jnp.full((batch, 1), t, jnp.int32)
    logits_BV, cache = step_fn(cache, tok_B1, positions_B1)
    sampled_B = sample(t, logits_BV)
    nxt = t + 1
    in_prompt_B = nxt < lengths_B
    generating_B = jnp.logical_and(jnp.logical_not(in_prompt_B), jnp.logical_not(done_B))
    prompt_tok_B = jax.lax.dynamic_slice_in_dim(tokens_BT, nxt, 1, axis=1)[:, 0]
    new_B = jnp.where(in_prompt_B, prompt_tok_B, jnp.where(generating_B, sampled_B, pad_id))
    tokens_BT = jax.lax.dynamic_update_slice_in_dim(tokens_BT, new_B[:, None], nxt, axis=1)
    out_len_B = jnp.where(generating_B, nxt + 1, out_len_B)
    finished_B = (nxt + 1 - lengths_B) >= max_new_tokens
    if eos_id is not None:
      finished_B = jnp.logical_or(finished_B, sampled_B == eos_id)
    done_B = jnp.logical_or(done_B, jnp.logical_and(generating_B, finished_B))
    return nxt, tokens_BT, done_B, out_len_B, cache

  if prefill_len > 0:
    positions_BP = jnp.broadcast_to(jnp.arange(prefill_len, dtype=jnp.int32)[None, :],
                                    (batch, prefill_len))
    _, cache = step_fn(cache, tokens_BT[:, :prefill_len], positions_BP)
  state = (jnp.int32(prefill_len), tokens_BT, jnp.zeros((batch,), jnp.bool_), lengths_B,
           cache)
  _, tokens_BT, _, out_len_B, _ = jax.lax.while_loop(cond, body, state)
  return tokens_BT, out_len_B


# --------------------------------------------------------------------------------------
# Argument checks (before any tracing)
# --------------------------------------------------------------------------------------


def _check_generate_args(prompt_BL, prompt_lengths, max_new_tokens, temperature, top_k,
                         top_p, eos_id, pad_id, *, prompt_name="prompt_BL"):
  if getattr(prompt_BL, "ndim", None) != 2 or prompt_BL.shape[1] < 1:
    raise ValueError(f"{prompt_name} must be int [batch, length >= 1]; got shape "
                     f"{getattr(prompt_BL, 'shape', None)}")
  if not jnp.issubdtype(prompt_BL.dtype, jnp.integer):
    raise TypeError(f"{prompt_name} must hold integer token ids; got dtype {prompt_BL.dtype}")
  if (isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, numbers.Integral)
      or max_new_tokens < 1):
    raise ValueError(f"max_new_tokens must be a Python int >= 1; got {max_new_tokens!r}")
  sampling._check_temperature(temperature)  # pylint: disable=protected-access
  sampling._check_top_k(top_k)  # pylint: disable=protected-access
  sampling._check_top_p(top_p)  # pylint: disable=protected-access
  for name, value in (("eos_id", eos_id), ("pad_id", pad_id)):
    if value is not None and (isinstance(value, bool)
                              or not isinstance(value, numbers.Integral)):
      raise TypeError(f"{name} must be a Python int{' or None' if name == 'eos_id' else ''}; "
                      f"got {value!r}")
  batch, length = prompt_BL.shape
  if prompt_lengths is None:
    return jnp.full((batch,), length, jnp.int32)
  if getattr(prompt_lengths, "shape", None) != (batch,):
    raise ValueError(f"prompt_lengths must be int [batch={batch}]; got shape "
                     f"{getattr(prompt_lengths, 'shape', None)}")
  try:
    lengths = np.asarray(prompt_lengths)
  except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
    lengths = None  # traced: checked by the caller's own logic, not here
  if lengths is not None:
    if not np.issubdtype(lengths.dtype, np.integer):
      raise TypeError(f"prompt_lengths must be integers; got dtype {lengths.dtype}")
    if lengths.min() < 1 or lengths.max() > length:
      raise ValueError(f"prompt_lengths must lie in [1, {length}] (every prompt needs at "
                       f"least one token, e.g. BOS); got {lengths.tolist()}")
  return jnp.asarray(prompt_lengths, jnp.int32)


def _check_max_len(model: Any, total: int, field: str = "max_len") -> None:
  """Raises if the model's config bounds the length (``max_len``) below ``total``."""
  cfg = getattr(model, "config", None)
  max_len = getattr(cfg, field, None)
  if isinstance(max_len, int) and total > max_len:
    raise ValueError(f"prompt length + max_new_tokens - 1 = {total} (the positions fed to "
                     f"the model) exceeds {type(cfg).__name__}.{field}={max_len}")


def _is_greedy(temperature) -> bool:
  return isinstance(temperature, numbers.Real) and temperature == 0


# --------------------------------------------------------------------------------------
# Decoder-only models
# --------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=(
    "model", "max_new_tokens", "top_k", "eos_id", "pad_id", "greedy", "use_top_p",
    "pass_positions", "prefill_len"))
def _generate_jit(model, params, prompt_BL, prompt_lengths_B, rng, temperature, top_p, *,
                  max_new_tokens, top_k, eos_id, pad_id, greedy, use_top_p, pass_positions,
                  prefill_len):
  batch, prompt_len = prompt_BL.shape
  # The last token is never fed back, so the cache holds one position less.
  cache = init_cache(model, jnp.zeros((batch, prompt_len + max_new_tokens - 1), jnp.int32))
  step = flax_step_fn(model, params, pass_positions=pass_positions)
  return sample_loop(step, cache, prompt_BL, prompt_lengths_B,
                     max_new_tokens=max_new_tokens, rng=rng, temperature=temperature,
                     top_k=top_k, top_p=top_p if use_top_p else None, eos_id=eos_id,
                     pad_id=pad_id, greedy=greedy, prefill_len=prefill_len)


def _bucketed_prefill(lengths_B: Array) -> int:
  """The largest power of two < min(prompt_lengths) (0 if that is 1, or if traced).

  Rounding down keeps the number of compiled variants logarithmic in the prompt length;
  the rest of each prompt is fed inside the loop.
  """
  try:
    shortest = int(np.min(np.asarray(lengths_B)))
  except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
    return 0
  if shortest <= 1:
    return 0
  return 1 << ((shortest - 1).bit_length() - 1)


def generate(model: nn.Module, params: PyTree, prompt_BL: Array, *, max_new_tokens: int,
             rng: Array | None = None, temperature: float | Array = 1.0,
             top_k: int | None = None, top_p: float | Array | None = None,
             eos_id: int | None = None, pad_id: int = 0,
             prompt_lengths: Array | None = None, pass_positions: bool = True,
             prefill: bool = True) -> tuple[Array, Array]:
  """Samples continuations of (ragged, right-padded) prompts with a decoder-only model.

  Args:
    model: a decoder-only Flax module (GPT, ImageGPT, ...); it is switched to decode mode
      here, so pass the training-mode module.
    params: its ``params`` collection (or ``{'params': ...}``).
    prompt_BL: int [batch, L]: prompts, right-padded (see ``prompt_lengths``).
    max_new_tokens: >= 1; the cache holds ``L + max_new_tokens - 1`` positions (the last
      token is never fed back), which must not exceed the model's ``max_len``.
    rng: one PRNG key or one per row; may be None only for greedy decoding.
    temperature: >= 0; 0 is greedy.
    top_k: keep the k most likely tokens (Python int) or None.
    top_p: nucleus mass in (0, 1] or None.
    eos_id: a row stops after emitting it (the EOS is kept in the output); None = never.
    pad_id: written after each row's end.
    prompt_lengths: int [batch] valid prompt tokens per row (each >= 1), or None for all L.
    pass_positions: pass ``positions`` (absolute positions, ``[B, L]``) to the model.
    prefill: feed the common prompt prefix (rounded down to a power of two) in one call;
      False feeds every prompt token through the loop (for caches that take one token at
      a time).
  Returns:
    ``(tokens_BT, lengths_B)``: int32 ``[batch, L + max_new_tokens]`` (each row: its prompt,
    then its generated tokens, then ``pad_id``) and int32 ``[batch]`` valid lengths.
  """
  lengths_B = _check_generate_args(prompt_BL, prompt_lengths, max_new_tokens, temperature,
                                   top_k, top_p, eos_id, pad_id)
  _check_max_len(model, prompt_BL.shape[1] + max_new_tokens - 1)
  greedy = _is_greedy(temperature)
  if rng is None:
    if not greedy:
      raise ValueError("rng is required unless temperature == 0 (greedy decoding)")
    rng = jax.random.key(0)
  return _generate_jit(
      decoding_module(model), params, jnp.asarray(prompt_BL), lengths_B, rng,
      jnp.asarray(1.0 if greedy else temperature, jnp.float32),
      jnp.asarray(1.0 if top_p is None else top_p, jnp.float32),
      max_new_tokens=max_new_tokens, top_k=top_k, eos_id=eos_id, pad_id=pad_id,
      greedy=greedy, use_top_p=top_p is not None, pass_positions=pass_positions,
      prefill_len=_bucketed_prefill(lengths_B) if prefill else 0)
