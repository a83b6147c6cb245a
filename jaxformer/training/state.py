"""The training state and its sharded creation.

``TrainState`` is plain data (a ``flax.struct`` pytree, no functions), so it jits,
donates and checkpoints as one tree. It is created directly in its final sharding::

  jax.eval_shape(init)                     -> abstract params with logical axis names
  sharding.state_shardings(init, tx)       -> NamedShardings (the mesh and rules of the
                                              run's ``Sharding``; optimizer state
                                              follows its parameters)
  jax.jit(init, out_shardings=...)         -> state, born sharded (no host copy)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct

InitFn = Callable[[jax.Array], dict[str, Any]]  # rng -> flax variables (boxed)


@struct.dataclass
class TrainState:
  """Everything that changes during training.

  Attributes:
    step: number of ``train_step`` calls made (micro-steps), int32 scalar.
    params: float32 master parameters (unboxed).
    opt_state: the optax state.
    rng: raw key data (``uint32[2]``-like, from ``jax.random.key_data``); per-step
      keys are ``fold_in(rng, step)``, so resuming reproduces them.
    skipped_steps: steps whose update was not applied (non-finite or loss spike).
    loss_ema: running mean of accepted losses (for the spike check), float32.
    spike_run: consecutive steps skipped as spikes (reset by an accepted step).
  """

  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array
  skipped_steps: jax.Array
  loss_ema: jax.Array
  spike_run: jax.Array

  def step_key(self) -> jax.Array:
    """The typed PRNG key for this step (folded by step)."""
    return jax.random.fold_in(jax.random.wrap_key_data(self.rng), self.step)


def _init_state(init_fn: InitFn, tx: optax.GradientTransformation,
                rng: jax.Array) -> TrainState:
  params_rng, state_rng = jax.random.split(rng)
  params = nn.meta.unbox(init_fn(params_rng)["params"])
  return TrainState(
      step=jnp.zeros([], jnp.int32),
      params=params,
      opt_state=tx.init(params),
      rng=jax.random.key_data(state_rng),
      skipped_steps=jnp.zeros([], jnp.int32),
      loss_ema=jnp.zeros([], jnp.float32),
      spike_run=jnp.zeros([], jnp.int32),
  )


def state_shardings_from(abstract_vars: Any, tx: optax.GradientTransformation,
                         param_shardings: Any, replicated: Any) -> TrainState:
  """A ``TrainState`` of shardings: ``param_shardings`` for the parameters, optimizer
  moments and accumulators following their parameters, ``replicated`` for the rest."""
  abstract_params = nn.meta.unbox(abstract_vars["params"])
  abstract_opt = jax.eval_shape(tx.init, abstract_params)
  opt_shardings = optax.tree_map_params(
      tx,
      lambda _, s: s,
      abstract_opt,
      param_shardings,
      transform_non_params=lambda _: replicated,
  )
  return TrainState(
      step=replicated,
      params=param_shardings,
      opt_state=opt_shardings,
      rng=replicated,
      skipped_steps=replicated,
      loss_ema=replicated,
      spike_run=replicated,
  )


def create_train_state(init_fn: InitFn, tx: optax.GradientTransformation,
                       rng: jax.Array,
                       sharding: Any) -> tuple[TrainState, TrainState]:
  """Initialises the state directly in its sharding.

  Args:
    init_fn: ``rng -> variables`` (e.g. ``lambda r: model.init(r, dummy_BL)``); params
      carry logical axis names via ``nn.with_logical_partitioning``.
    tx: the optimizer.
    rng: typed PRNG key (``jax.random.key(seed)``).
    sharding: the run's :class:`jaxformer.training.sharding.Sharding`.
  Returns:
    ``(state, shardings)``, shardings being a ``TrainState`` of ``NamedSharding``.
  """
  shardings = sharding.state_shardings(init_fn, tx)
  with sharding.activate():
    state = jax.jit(lambda r: _init_state(init_fn, tx, r),
                    out_shardings=shardings)(rng)
  return state, shardings


def abstract_train_state(init_fn: InitFn, tx: optax.GradientTransformation,
                         sharding: Any) -> TrainState:
  """``jax.ShapeDtypeStruct`` leaves with shardings: the target for a sharded restore."""
  shardings = sharding.state_shardings(init_fn, tx)
  with sharding.activate():
    shapes = jax.eval_shape(lambda r: _init_state(init_fn, tx, r),
                            jax.random.key(0))
  return jax.tree.map(
      lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes,
      shardings)


def count_params(params: Any) -> int:
  """Number of scalar parameters in a tree."""
  return sum(int(x.size) for x in jax.tree.leaves(params))
