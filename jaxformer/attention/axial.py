"""Axial attention (Ho et al. 2019): attention along one axis of ``[B, *axes, D]``.

The chosen axis is moved next to the batch, the other axes are folded into the batch,
``MultiHeadAttention`` runs on ``[B * rest, L_axis, D]`` and the result is folded back.
A stack of such layers, one per axis in the order given, lets every position see every
other one in ``len(axes)`` steps at ``O(N * sum(L_axis))`` cost. On images
``[B, H, W, D]``, attending along axis 1 (H) mixes the pixels of one *column* ("column
attention") and along axis 2 (W) those of one *row* ("row attention"), as in
``jaxformer.models.axial_transformer``; :func:`axial_attention_stack` goes from the
last spatial axis to the first: rows, then columns, as those models do.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxformer.attention.multi_head import MultiHeadAttention

Array = jax.Array


class AxialAttention(nn.Module):
  """Self attention along ``axis`` of ``x [B, *axes, D]``.

  Attributes:
    num_heads: attention heads.
    axis: which axis of ``x`` to attend along (numpy style, counting the batch: ``1`` is
      the first spatial axis, ``-2`` the last); neither the batch nor the features.
    is_causal: causal along that axis.
    attention_kwargs: further ``MultiHeadAttention`` attributes, overriding the ones
      below (a model passes ``BlockConfig.attention_kwargs(...)`` whole, so a new
      attention knob needs no field here).
    The remaining attributes are passed to ``MultiHeadAttention``.
  """
  num_heads: int
  axis: int
  is_causal: bool = False
  attention_kwargs: Mapping[str, Any] | None = None
  num_kv_heads: int | None = None
  head_dim: int | None = None
  out_features: int | None = None
  use_bias: bool = True
  dropout_rate: float = 0.0
  scale: float | None = None
  hard: bool | str = False
  rotary_base: float | None = None
  implementation: str | None = None
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  kernel_init: Callable[..., Array] = nn.initializers.xavier_uniform()
  bias_init: Callable[..., Array] = nn.initializers.zeros_init()
  out_kernel_init: Callable[..., Array] | None = None

  @nn.compact
  def __call__(self, x: Array, *, deterministic: bool = True,
               return_weights: bool = False) -> Array | tuple[Array, Array]:
    """``x [B, *axes, D]`` -> ``[B, *axes, out_features]``.

    With ``return_weights`` also returns the weights ``[B, *other_axes, H, L, L]``
    (``L`` the length of ``axis``; the other axes in their original order) and sows
    them into 'intermediates' as ``axial_attention_weights`` (the inner
    ``MultiHeadAttention`` sows its folded ``[B * prod(other_axes), H, L, L]`` view as
    ``attention/attention_weights`` too).
    """
    axis = _normalize_axis(self.axis, x.ndim)
    x_moved = jnp.moveaxis(x, axis, -2)                   # [B, *others, L, D]
    folded_shape = x_moved.shape
    x_NLD = x_moved.reshape((-1,) + folded_shape[-2:])
    options = dict(
        num_heads=self.num_heads, num_kv_heads=self.num_kv_heads, head_dim=self.head_dim,
        out_features=self.out_features, use_bias=self.use_bias,
        dropout_rate=self.dropout_rate, scale=self.scale, hard=self.hard,
        rotary_base=self.rotary_base,
        implementation=self.implementation, dtype=self.dtype,
        param_dtype=self.param_dtype, kernel_init=self.kernel_init,
        bias_init=self.bias_init, out_kernel_init=self.out_kernel_init)
    y_NLO = MultiHeadAttention(**{**options, **(self.attention_kwargs or {})},
                               name="attention")(
            x_NLD, is_causal=self.is_causal, deterministic=deterministic,
            return_weights=return_weights)
    if return_weights:
      y_NLO, weights_NHLL = y_NLO
    y = jnp.moveaxis(y_NLO.reshape(folded_shape[:-1] + y_NLO.shape[-1:]), -2, axis)
    if not return_weights:
      return y
    weights = weights_NHLL.reshape(folded_shape[:-2] + weights_NHLL.shape[1:])
    self.sow("intermediates", "axial_attention_weights", weights)
    return y, weights


class AxialAttentionStack(nn.Module):
  """One ``AxialAttention`` per axis, applied in the order of ``axes``.

  Attributes:
    num_heads: heads of every layer.
    axes: the axes to attend along, in order; e.g. ``(1, 2)`` for ``[B, H, W, D]``:
      along H first (within each column), then along W (within each row).
    is_causal: one flag for all layers or one per axis.
    mha_kwargs: further ``AxialAttention`` attributes (``head_dim``, ``dtype``, ...).
  """
  num_heads: int
  axes: Sequence[int]
  is_causal: bool | Sequence[bool] = False
  mha_kwargs: dict[str, Any] | None = None

  @nn.compact
  def __call__(self, x: Array, *, deterministic: bool = True) -> Array:
    causal = self.is_causal
    if isinstance(causal, bool):
      causal = [causal] * len(self.axes)
    if len(causal) != len(self.axes):
      raise ValueError(f"AxialAttentionStack: is_causal={self.is_causal!r} must be a bool "
                       f"or have one entry per axis in axes={tuple(self.axes)}")
    for i, (axis, c) in enumerate(zip(self.axes, causal)):
      x = AxialAttention(num_heads=self.num_heads, axis=axis, is_causal=c,
                         name=f"axis_{i}", **(self.mha_kwargs or {}))(
                             x, deterministic=deterministic)
    return x


def axial_attention_stack(num_heads: int, num_spatial_axes: int, *,
                          is_causal: bool | Sequence[bool] = False,
                          **mha_kwargs: Any) -> AxialAttentionStack:
  """``AxialAttentionStack`` over every spatial axis of ``[B, *axes, D]``, last first.

  On images ``[B, H, W, D]`` the first layer attends along W (axis 2: within each row,
  row attention), the second along H (axis 1: within each column, column attention),
  the order of ``jaxformer.models.axial_transformer``.

  Args:
    num_heads: heads per layer.
    num_spatial_axes: number of axes between batch and features (2 for images).
    is_causal: one flag, or one per layer (in the layers' order: last axis first).
    **mha_kwargs: further ``AxialAttention`` attributes.
  """
  if num_spatial_axes < 1:
    raise ValueError(f"axial_attention_stack: num_spatial_axes={num_spatial_axes}; "
                     f"expected >= 1")
  return AxialAttentionStack(num_heads=num_heads,
                             axes=tuple(range(num_spatial_axes, 0, -1)),
                             is_causal=(is_causal if isinstance(is_causal, bool)
                                        else tuple(is_causal)),
                             mha_kwargs=mha_kwargs or None)


def _normalize_axis(axis: int, ndim: int) -> int:
  if ndim < 3:
    raise ValueError(f"AxialAttention: input must be [batch, *axes, features], got rank "
                     f"{ndim}")
  normalized = axis + ndim if axis < 0 else axis
  if not 1 <= normalized <= ndim - 2:
    raise ValueError(f"AxialAttention: axis={axis} for a rank-{ndim} input; expected an "
                     f"axis between batch and features: 1..{ndim - 2} or "
                     f"{-(ndim - 1)}..-2")
  return normalized
