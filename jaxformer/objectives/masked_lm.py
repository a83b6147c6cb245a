"""BERT masked language modelling: token masking (jax.random, jittable) and loss."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxformer.objectives import common


def mask_tokens(rng: jax.Array, tokens: jax.Array, *, vocab_size: int, mask_id: int,
                special_ids: Sequence[int], mask_rate: float = 0.15,
                replace_mask: float = 0.8, replace_random: float = 0.1
                ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """BERT masking.

  Each token that is not special (``special_ids`` should include ``[PAD]``, ``[CLS]``,
  ``[SEP]``, ...) is chosen independently with probability ``mask_rate``. A chosen
  token is replaced by ``mask_id`` with probability ``replace_mask``, by a random
  non-special token with probability ``replace_random``, and kept otherwise. The loss
  counts chosen positions only.

  Args:
    rng: a ``jax.random`` key.
    tokens: ``[...]`` int token ids (e.g. ``[batch, length]``).
    vocab_size: ids are in ``[0, vocab_size)``; random replacements are drawn
      uniformly from the non-special ids.
    mask_id: the ``[MASK]`` id.
    special_ids: ids never chosen (static).
    mask_rate: probability that a non-special token is chosen.
    replace_mask: of the chosen, fraction replaced by ``[MASK]``.
    replace_random: of the chosen, fraction replaced by a random token.

  Returns:
    ``(inputs, targets, weights)``: ``inputs`` int32 ``[...]`` the masked tokens,
    ``targets`` int32 ``[...]`` the original tokens, ``weights`` float32 ``[...]`` 1.0
    at chosen positions.
  """
  for name, value in (("mask_rate", mask_rate), ("replace_mask", replace_mask),
                      ("replace_random", replace_random)):
    if not 0.0 <= value <= 1.0:
      raise ValueError(f"{name} must be in [0, 1], got {value}.")
  if replace_mask + replace_random > 1.0:
    raise ValueError(f"replace_mask + replace_random must be <= 1, got "
                     f"{replace_mask} + {replace_random}.")
  special = np.unique(np.asarray(list(special_ids) + [mask_id], np.int64))
  if special.size and (special.min() < 0 or special.max() >= vocab_size):
    raise ValueError(f"special_ids and mask_id must be in [0, vocab_size={vocab_size}),"
                     f" got {special.tolist()}.")
  allowed = np.setdiff1d(np.arange(vocab_size), special).astype(np.int32)
  if allowed.size == 0:
    raise ValueError("every id is special; nothing can be masked.")
  if not jnp.issubdtype(tokens.dtype, jnp.integer):
    raise TypeError(f"tokens must be integer ids, got {tokens.dtype}.")

  tokens = tokens.astype(jnp.int32)
  choose_key, action_key, random_key = jax.random.split(rng, 3)
  is_special = jnp.isin(tokens, jnp.asarray(special, jnp.int32))
  chosen = (jax.random.uniform(choose_key, tokens.shape) < mask_rate) & ~is_special
  action = jax.random.uniform(action_key, tokens.shape)
  random_tokens = jnp.asarray(allowed)[
      jax.random.randint(random_key, tokens.shape, 0, allowed.size)]
  inputs = jnp.where(chosen & (action < replace_mask), jnp.int32(mask_id), tokens)
  use_random = chosen & (action >= replace_mask) & (
      action < replace_mask + replace_random)
  inputs = jnp.where(use_random, random_tokens, inputs)
  return inputs, tokens, chosen.astype(jnp.float32)


def loss(logits: jax.Array, targets: jax.Array, weights: jax.Array
         ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Cross-entropy over the masked positions.

  Args:
    logits: ``[..., vocab]`` MLM head logits.
    targets: ``[...]`` original ids (from :func:`mask_tokens`).
    weights: ``[...]`` 1.0 at masked positions.

  Returns:
    ``(loss, metrics)`` with ``loss``, ``nll``, ``accuracy``, ``num_tokens`` (masked
    positions), float32.
  """
  common.check_logits_targets(logits, targets, weights, what="masked_lm.loss")
  return common.mean_metrics(*common.cross_entropy_sums(logits, targets, weights))
