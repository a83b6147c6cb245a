"""LayerNorm / RMSNorm chosen by name, with logical axis names on scale and bias.

Below attention and layers (like :mod:`jaxformer.axes`): the blocks' norms
(``BlockConfig.make_norm``) and attention's q/k norms are both made here."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from jaxformer import axes

Dtype = Any
NORM_TYPES = ("layernorm", "rmsnorm")
NORM_PLACEMENTS = ("pre", "post")


def check_norm(norm: str, norm_type: str) -> None:
  """Raises ValueError for an unknown placement (``norm``) or kind (``norm_type``)."""
  if norm not in NORM_PLACEMENTS:
    raise ValueError(f"norm={norm!r}; expected one of {NORM_PLACEMENTS} "
                     "(pre-LN: x + f(LN(x)), GPT-2/ViT; post-LN: LN(x + f(x)), BERT)")
  if norm_type not in NORM_TYPES:
    raise ValueError(f"norm_type={norm_type!r}; expected one of {NORM_TYPES}")


def make_norm(norm_type: str = "layernorm", *, eps: float = 1e-5,
              dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
              name: str | None = None, axis: str = axes.NORM) -> nn.Module:
  """A LayerNorm (scale + bias) or RMSNorm (scale) over the last axis.

  Statistics are computed in float32 by Flax whatever ``dtype`` is. ``axis`` is the
  logical name of the scale and bias (``axes.HEAD_DIM`` for a per-head q/k norm).
  """
  if norm_type not in NORM_TYPES:
    raise ValueError(f"norm_type={norm_type!r}; expected one of {NORM_TYPES}")
  scale_init = nn.with_logical_partitioning(nn.initializers.ones, (axis,))
  if norm_type == "layernorm":
    return nn.LayerNorm(
        epsilon=eps, dtype=dtype, param_dtype=param_dtype, scale_init=scale_init,
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (axis,)),
        name=name)
  return nn.RMSNorm(epsilon=eps, dtype=dtype, param_dtype=param_dtype,
                    scale_init=scale_init, name=name)
