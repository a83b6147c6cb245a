"""Beam search over a cached step function, and its encoder-decoder entry point.

Scores are summed natural-log probabilities divided by the GNMT length penalty
``((5 + length) / 6) ** alpha`` (``alpha = 0``: plain log-probability), where ``length``
counts generated tokens (EOS included). Each step expands every alive beam by the whole
vocabulary, keeps the ``2K`` best candidates, moves those that end in EOS to a finished
pool (the best ``K`` kept) and the best ``K`` others to the alive set, reordering the
cache to follow them. After ``max_new_tokens`` steps the alive beams that never emitted
EOS join the pool; the result is sorted best first. Beams never stop early (simple and
exact for a fixed budget).

With ``num_beams = 1`` this is greedy decoding; with ``num_beams >= vocab`` and two steps it
is exhaustive search (both are tests).
"""

from __future__ import annotations

import functools
import numbers
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxformer.generation import decode as dec_lib
from jaxformer.generation import seq2seq

Array = jax.Array
PyTree = Any

_NEG = -1.0e9


def length_penalty(length: Array, alpha: float) -> Array:
  """GNMT length penalty ``((5 + length) / 6) ** alpha`` (float32)."""
  return ((5.0 + length.astype(jnp.float32)) / 6.0) ** alpha


def cache_batch_axes(cache_shapes_fn) -> PyTree:
  """The batch axis of each cache leaf (None for leaves without one, e.g. an index).

  Args:
    cache_shapes_fn: ``batch -> cache`` (shapes suffice; it is called under eval_shape
      with batch 2 and 3 and the axis whose size changes is the batch axis).
  """
  a = jax.eval_shape(lambda: cache_shapes_fn(2))
  b = jax.eval_shape(lambda: cache_shapes_fn(3))

  def axis(x, y):
    diff = [i for i, (m, n) in enumerate(zip(x.shape, y.shape)) if m != n]
    return diff[0] if diff else None

  return jax.tree_util.tree_map(axis, a, b)


def _gather_cache(cache: PyTree, axes: PyTree, flat_idx: Array) -> PyTree:
  def gather(x, axis):
    return x if axis is None else jnp.take(x, flat_idx, axis=axis)
  return jax.tree_util.tree_map(gather, cache, axes)


def beam_search_loop(step_fn: dec_lib.StepFn, cache: PyTree, cache_axes: PyTree,
                     start_B: Array, *, num_beams: int, max_new_tokens: int,
                     eos_id: int | None = None, pad_id: int = 0,
                     alpha: float = 0.0) -> tuple[Array, Array, Array]:
  """Jittable beam search from one start token per row.

  Args:
    step_fn: ``(cache, tokens_N1, positions_N1) -> (logits_NV, cache)`` with
      ``N = batch * num_beams`` (rows ``b * K + k``).
    cache: the initial cache for ``N`` rows.
    cache_axes: ``cache_batch_axes`` of that cache.
    start_B: int [batch] first token (e.g. BOS) at position 0.
    num_beams: K.
    max_new_tokens: steps.
    eos_id: finishing token or None.
    pad_id: fills positions after EOS.
    alpha: length-penalty exponent.
  Returns:
    ``(tokens_BKT, scores_BK, lengths_BK)``: ``T = 1 + max_new_tokens``, best first;
    lengths count the start token and EOS.
  """
  batch, k = start_B.shape[0], num_beams
  total = 1 + max_new_tokens
  seqs_BKT = jnp.full((batch, k, total), pad_id, jnp.int32)
  seqs_BKT = seqs_BKT.at[:, :, 0].set(start_B.astype(jnp.int32)[:, None])
  alive_BK = jnp.broadcast_to(jnp.where(jnp.arange(k) == 0, 0.0, _NEG)[None, :], (batch, k))
  fin_seqs_BKT = seqs_BKT
  fin_scores_BK = jnp.full((batch, k), _NEG, jnp.float32)
  fin_len_BK = jnp.ones((batch, k), jnp.int32)
  rows_B1 = jnp.arange(batch)[:, None]

  def body(t, state):
    seqs_BKT, alive_BK, cache, fin_seqs_BKT, fin_scores_BK, fin_len_BK = state
    tok_N1 = seqs_BKT[:, :, t].reshape(batch * k, 1)
    logits_NV, cache = step_fn(cache, tok_N1, jnp.full((batch * k, 1), t, jnp.int32))
    vocab = logits_NV.shape[-1]
    logp_BKV = jax.nn.log_softmax(logits_NV, axis=-1).reshape(batch, k, vocab)
    cand_BKV = alive_BK[:, :, None] + logp_BKV
    top_B2, idx_B2 = jax.lax.top_k(cand_BKV.reshape(batch, k * vocab), 2 * k)
    beam_B2, tok_B2 = idx_B2 // vocab, (idx_B2 % vocab).astype(jnp.int32)
    cand_seqs_B2T = jnp.take_along_axis(seqs_BKT, beam_B2[:, :, None], axis=1)
    cand_seqs_B2T = cand_seqs_B2T.at[:, :, t + 1].set(tok_B2)
    is_eos_B2 = (tok_B2 == eos_id) if eos_id is not None else jnp.zeros_like(tok_B2, bool)
    # Alive: the best K candidates that did not just emit EOS.
    alive_scores_B2 = jnp.where(is_eos_B2, _NEG, top_B2)
    new_alive_BK, pick_BK = jax.lax.top_k(alive_scores_B2, k)
    new_seqs_BKT = jnp.take_along_axis(cand_seqs_B2T, pick_BK[:, :, None], axis=1)
    src_beam_BK = jnp.take_along_axis(beam_B2, pick_BK, axis=1)
    cache = _gather_cache(cache, cache_axes, (rows_B1 * k + src_beam_BK).reshape(-1))
    # Finished: merge the old pool with candidates that emitted EOS.
    gen_len = t + 1
    valid_eos_B2 = jnp.logical_and(is_eos_B2, top_B2 > _NEG / 2)
    eos_scores_B2 = jnp.where(valid_eos_B2,
                              top_B2 / length_penalty(jnp.asarray(gen_len), alpha), _NEG)
    pool_scores = jnp.concatenate([fin_scores_BK, eos_scores_B2], axis=1)
    pool_seqs = jnp.concatenate([fin_seqs_BKT, cand_seqs_B2T], axis=1)
    pool_len = jnp.concatenate([fin_len_BK, jnp.full_like(tok_B2, gen_len + 1)], axis=1)
    fin_scores_BK, keep_BK = jax.lax.top_k(pool_scores, k)
    fin_seqs_BKT = jnp.take_along_axis(pool_seqs, keep_BK[:, :, None], axis=1)
    fin_len_BK = jnp.take_along_axis(pool_len, keep_BK, axis=1)
    return new_seqs_BKT, new_alive_BK, cache, fin_seqs_BKT, fin_scores_BK, fin_len_BK

  state = (seqs_BKT, alive_BK, cache, fin_seqs_BKT, fin_scores_BK, fin_len_BK)
  seqs_BKT, alive_BK, _, fin_seqs_BKT, fin_scores_BK, fin_len_BK = jax.lax.fori_loop(
      0, max_new_tokens, body, state)
  # Beams still alive at the end join the pool with their penalised scores.
  alive_final_BK = jnp.where(alive_BK > _NEG / 2,
                             alive_BK / length_penalty(jnp.asarray(max_new_tokens), alpha),
                             _NEG)
  scores = jnp.concatenate([fin_scores_BK, alive_final_BK], axis=1)
  seqs = jnp.concatenate([fin_seqs_BKT, seqs_BKT], axis=1)
  lens = jnp.concatenate([fin_len_BK, jnp.full((batch, k), total, jnp.int32)], axis=1)
  scores_BK, keep_BK = jax.lax.top_k(scores, k)
  tokens_BKT = jnp.take_along_axis(seqs, keep_BK[:, :, None], axis=1)
  lengths_BK = jnp.take_along_axis(lens, keep_BK, axis=1)
  return tokens_BKT, scores_BK, lengths_BK


@functools.partial(jax.jit, static_argnames=(
    "model", "num_beams", "max_new_tokens", "bos_id", "eos_id", "pad_id", "alpha"))
def _beam_search_seq2seq_jit(model, params, source_BS, source_mask_BS, *, num_beams,
                             max_new_tokens, bos_id, eos_id, pad_id, alpha):
  batch, src_len = source_BS.shape
  k = num_beams
  target_len = max_new_tokens  # tokens fed to the decoder: BOS and all but the last
  src_NS = jnp.repeat(source_BS, k, axis=0)
  mask_NS = jnp.repeat(source_mask_BS, k, axis=0)
  decoding, encoded_NSD, cache = seq2seq.encode_and_init(model, params, src_NS, mask_NS,
                                                         target_len)

  def cache_for(n):
    return dec_lib.init_cache(decoding, jnp.zeros((n, src_len), jnp.int32),
                              jnp.zeros((n, target_len), jnp.int32),
                              jnp.ones((n, src_len), jnp.bool_))

  step = seq2seq.encoder_decoder_step_fn(decoding, params, encoded_NSD, mask_NS)
  return beam_search_loop(step, cache, cache_batch_axes(cache_for),
                          jnp.full((batch,), bos_id, jnp.int32), num_beams=k,
                          max_new_tokens=max_new_tokens, eos_id=eos_id, pad_id=pad_id,
                          alpha=alpha)


def beam_search_seq2seq(model: nn.Module, params: PyTree, source_BS: Array, *,
                        num_beams: int, max_new_tokens: int, bos_id: int,
                        eos_id: int | None = None, pad_id: int = 0,
                        source_mask: Array | None = None,
                        alpha: float = 0.0) -> tuple[Array, Array, Array]:
  """Beam search with an ``EncoderDecoder`` (see the module docstring).

  Args:
    model: an ``EncoderDecoder`` (training mode).
    params: its ``params`` (or ``{'params': ...}``).
    source_BS: int [batch, S].
    num_beams: K >= 1.
    max_new_tokens: >= 1 target tokens after BOS.
    bos_id: decoder start token.
    eos_id: finishing token (None: every hypothesis has ``max_new_tokens`` tokens).
    pad_id: fills positions after EOS.
    source_mask: bool [batch, S], True at real tokens (None: all real).
    alpha: length-penalty exponent (0.6 in GNMT/Transformer papers; 0 = none).
  Returns:
    ``(tokens_BKT, scores_BK, lengths_BK)``: ``T = 1 + max_new_tokens`` (BOS first), the
    K hypotheses best first, their penalised log-probabilities and valid lengths.
  """
  seq2seq._check_source(source_BS, source_mask)  # pylint: disable=protected-access
  if isinstance(num_beams, bool) or not isinstance(num_beams, numbers.Integral) or (
      num_beams < 1):
    raise ValueError(f"num_beams must be a Python int >= 1; got {num_beams!r}")
  if isinstance(bos_id, bool) or not isinstance(bos_id, numbers.Integral):
    raise TypeError(f"bos_id must be a Python int; got {bos_id!r}")
  dec_lib._check_generate_args(  # pylint: disable=protected-access
      jnp.zeros((source_BS.shape[0], 1), jnp.int32), None, max_new_tokens, 1.0, None,
      None, eos_id, pad_id)
  dec_lib._check_max_len(model, max_new_tokens)  # pylint: disable=protected-access
  if source_mask is None:
    source_mask = jnp.ones(source_BS.shape, jnp.bool_)
  return _beam_search_seq2seq_jit(
      model, params, jnp.asarray(source_BS), jnp.asarray(source_mask, jnp.bool_),
      num_beams=num_beams, max_new_tokens=max_new_tokens, bos_id=bos_id, eos_id=eos_id,
      pad_id=pad_id, alpha=float(alpha))
