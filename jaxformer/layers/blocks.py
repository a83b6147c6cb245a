"""Transformer blocks (encoder, decoder) and ``BlockConfig``, the one home of block fields.

Placement of the norm (``BlockConfig.norm``):
  * ``"post"`` (original Transformer, BERT): ``x = LN(x + dropout(f(x)))``;
  * ``"pre"``  (GPT-2, ViT): ``x = x + dropout(f(LN(x)))``, and the ``Stack`` ends with a
    final LN (``final_norm``).
Dropout sits where the papers put it: on attention weights (inside attention), and on
each sublayer's output before the residual add; embedding dropout is the model's job.

Every model config holds one ``BlockConfig`` in its ``block`` field, so a new block-level
knob is one field here plus its use in ``attention_kwargs`` (or a block below).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxformer import axes
from jaxformer.attention import MultiHeadAttention
from jaxformer.layers.mlp import MLP, check_activation
from jaxformer.norms import NORM_PLACEMENTS, NORM_TYPES, make_norm
# The stack lives in its own module; re-exported so `blocks` stays the one import.
from jaxformer.layers.stack import Stack, stack_layer_params, unstack_layer_params  # noqa: F401

Array = jax.Array
Dtype = Any

_ACT_AXES = (axes.ACT_BATCH, axes.ACT_LENGTH, axes.ACT_EMBED)
ATTENTION_IMPLS = (None, "xla", "chunked", "pallas", "cudnn")


@dataclasses.dataclass(frozen=True)
class BlockConfig:
  """Everything one transformer block needs; each model config holds one in ``block``.

  Attributes:
    num_heads: query heads.
    mlp_dim: feed-forward hidden width.
    num_kv_heads: key/value heads (grouped-query attention); None = num_heads.
    head_dim: per-head width of queries and keys; None = features // num_heads.
    value_head_dim: per-head width of values (d_v); None = head_dim.
    activation: MLP activation, see ``jaxformer.layers.mlp.ACTIVATIONS``.
    norm: ``"pre"`` or ``"post"``.
    norm_type: ``"layernorm"`` or ``"rmsnorm"``.
    norm_eps: epsilon of the norms.
    use_bias: biases in the MLP, and the default of ``qkv_bias`` / ``out_bias``.
    qkv_bias: biases on the query/key/value projections (W_q, W_k, W_v); None = use_bias.
    out_bias: bias on the attention output projection (W_h); None = use_bias.
    qk_norm: normalise q and k per head (a ``norm_type`` norm over head_dim, eps
      ``norm_eps``) before the dot product.
    dropout_rate: dropout on each sublayer's output (before the residual add); models
      use it on their embeddings too.
    attention_dropout_rate: dropout on attention weights.
    rotary_base: RoPE base, used when the model's ``positions == "rotary"``.
    attention_impl: ``implementation`` of ``dot_product_attention``.
    attention_scale_multiplier: the attention logits' inverse temperature as a multiple
      of the usual ``1/sqrt(head_dim)``: ``beta = attention_scale_multiplier /
      sqrt(head_dim)`` (0 = uniform attention over the allowed keys; large = towards
      arg-max). 1.0 (default) is the standard scaled dot product.
    attention_hard: arg-max (hard) attention: each query takes the value of its
      best-scoring allowed key; runs on the xla path. ``True``: no gradient reaches the
      queries and keys (the weights are a step function of them), only the values.
      ``"straight_through"``: the same forward with the softmax's gradient (at
      ``attention_scale_multiplier``'s β), so queries and keys train too.
    decode: incremental decoding: causal self attention keeps a KV cache in 'cache'
      (the one decode switch of every model; see ``jaxformer.generation``).
    return_weights: sow attention weights into 'intermediates'.
    init_stddev: None -> the attention/MLP default initializers (xavier uniform);
      a float -> normal(stddev) kernels (GPT-2 / BERT use 0.02).
    residual_init_stddev: None -> the residual-output projections (attention ``out``
      and MLP ``wo``) are initialised like the other kernels; a float -> normal(stddev)
      for those two.
    dtype / param_dtype: compute / parameter dtypes (strings such as "bfloat16" are
      accepted and normalised).
  """
  num_heads: int
  mlp_dim: int
  num_kv_heads: int | None = None
  head_dim: int | None = None
  value_head_dim: int | None = None
  activation: str = "gelu"
  norm: str = "pre"
  norm_type: str = "layernorm"
  norm_eps: float = 1e-5
  use_bias: bool = True
  qkv_bias: bool | None = None
  out_bias: bool | None = None
  qk_norm: bool = False
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  rotary_base: float = 10_000.0
  attention_impl: str | None = None
  attention_scale_multiplier: float = 1.0
  attention_hard: bool | str = False
  decode: bool = False
  return_weights: bool = False
  init_stddev: float | None = None
  residual_init_stddev: float | None = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def __post_init__(self):
    own = "BlockConfig"
    for name in ("dtype", "param_dtype"):
      try:
        object.__setattr__(self, name, jnp.dtype(getattr(self, name)))
      except TypeError:
        raise TypeError(f"{own}.{name}={getattr(self, name)!r}: expected a dtype such "
                        "as 'float32' or 'bfloat16'") from None
    if self.norm not in NORM_PLACEMENTS:
      raise ValueError(f"{own}.norm={self.norm!r}: expected one of {NORM_PLACEMENTS} "
                       "(pre-LN: x + f(LN(x)), GPT-2/ViT; post-LN: LN(x + f(x)), BERT)")
    if self.norm_type not in NORM_TYPES:
      raise ValueError(f"{own}.norm_type={self.norm_type!r}: expected one of "
                       f"{NORM_TYPES}")
    check_activation(self.activation, field=f"{own}.activation")
    for name in ("num_heads", "mlp_dim"):
      _check_int(own, name, getattr(self, name), optional=False)
    for name in ("num_kv_heads", "head_dim", "value_head_dim"):
      _check_int(own, name, getattr(self, name), optional=True)
    if self.num_kv_heads is not None and self.num_heads % self.num_kv_heads:
      raise ValueError(f"{own}.num_kv_heads={self.num_kv_heads}: expected a divisor of "
                       f"num_heads={self.num_heads}")
    for name in ("use_bias", "qk_norm", "decode", "return_weights"):
      if not isinstance(getattr(self, name), bool):
        raise TypeError(f"{own}.{name}={getattr(self, name)!r}: expected a bool")
    for name in ("qkv_bias", "out_bias"):
      if getattr(self, name) not in (None, True, False):
        raise TypeError(f"{own}.{name}={getattr(self, name)!r}: expected None (= "
                        "use_bias) or a bool")
    for name in ("dropout_rate", "attention_dropout_rate"):
      value = getattr(self, name)
      if not 0.0 <= value < 1.0:
        raise ValueError(f"{own}.{name}={value!r}: expected 0 <= rate < 1")
    for name in ("init_stddev", "residual_init_stddev"):
      value = getattr(self, name)
      if value is not None and not value > 0:
        raise ValueError(f"{own}.{name}={value!r}: expected None or a float > 0")
    if not self.norm_eps > 0:
      raise ValueError(f"{own}.norm_eps={self.norm_eps!r}: expected a float > 0")
    if not self.rotary_base > 0:
      raise ValueError(f"{own}.rotary_base={self.rotary_base!r}: expected a float > 0")
    if self.attention_impl not in ATTENTION_IMPLS:
      raise ValueError(f"{own}.attention_impl={self.attention_impl!r}: expected one of "
                       f"{ATTENTION_IMPLS}")
    check_attention_options(self, own)

  def make_norm(self, name: str) -> nn.Module:
    """The blocks' norm (``norm_type``, ``norm_eps``, dtypes) named ``name``; every
    norm of a model that follows its blocks (final, embedding, head norms) is this."""
    return make_norm(self.norm_type, eps=self.norm_eps, dtype=self.dtype,
                     param_dtype=self.param_dtype, name=name)

  def qk_dim(self, features: int) -> int:
    """Per-head width of queries and keys for inputs ``[..., features]``."""
    return self.head_dim or features // self.num_heads

  def attention_scale(self, features: int) -> float | None:
    """``scale`` of the attention modules for inputs ``[..., features]``.

    None (the default ``1/sqrt(head_dim)``) unless ``attention_scale_multiplier != 1``.
    """
    return attention_scale(self.attention_scale_multiplier, self.qk_dim(features))

  def kernel_init(self) -> dict[str, Any]:
    """``{'kernel_init': ...}`` for the sub-modules, or ``{}`` for their defaults."""
    if self.init_stddev is None:
      return {}
    return {"kernel_init": nn.initializers.normal(stddev=self.init_stddev)}

  def out_kernel_init(self) -> dict[str, Any]:
    """``{'out_kernel_init': ...}`` for the residual-output projections, or ``{}``."""
    if self.residual_init_stddev is None:
      return {}
    return {"out_kernel_init": nn.initializers.normal(stddev=self.residual_init_stddev)}

  def attention_kwargs(self, features: int, *, rotary: bool = False) -> dict[str, Any]:
    """``MultiHeadAttention`` / ``AxialAttention`` attributes for inputs ``[..., features]``.

    The one place a block-level attention knob turns into a module attribute (blocks and
    the axial models both build their attention from it). ``decode`` is not included:
    only causal self attention keeps a cache, so the caller decides.
    """
    return dict(
        num_heads=self.num_heads, num_kv_heads=self.num_kv_heads, head_dim=self.head_dim,
        value_head_dim=self.value_head_dim, use_bias=self.use_bias,
        qkv_bias=self.qkv_bias, out_bias=self.out_bias,
        qk_norm=self.norm_type if self.qk_norm else None, qk_norm_eps=self.norm_eps,
        dropout_rate=self.attention_dropout_rate, scale=self.attention_scale(features),
        hard=self.attention_hard, rotary_base=self.rotary_base if rotary else None,
        implementation=self.attention_impl, dtype=self.dtype,
        param_dtype=self.param_dtype, **self.kernel_init(), **self.out_kernel_init())


def _check_int(owner: str, name: str, value: Any, *, optional: bool) -> None:
  if optional and value is None:
    return
  if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
    what = "None or a positive int" if optional else "a positive int"
    raise ValueError(f"{owner}.{name}={value!r}: expected {what}")


def check_attention_options(cfg: Any, owner: str) -> None:
  """Validates ``cfg.attention_scale_multiplier`` / ``cfg.attention_hard``.

  Normalises an int multiplier (e.g. from a command-line override) to float. Raises
  ValueError/TypeError naming ``owner.field``, the value and what would be valid.
  """
  multiplier = cfg.attention_scale_multiplier
  if (isinstance(multiplier, bool) or not isinstance(multiplier, (int, float))
      or not math.isfinite(multiplier) or multiplier < 0):
    raise ValueError(f"{owner}.attention_scale_multiplier={multiplier!r}: expected a "
                     "finite float >= 0 (1.0 = the usual 1/sqrt(head_dim))")
  object.__setattr__(cfg, "attention_scale_multiplier", float(multiplier))
  if not (isinstance(cfg.attention_hard, bool)
          or cfg.attention_hard == "straight_through"):
    raise TypeError(f"{owner}.attention_hard={cfg.attention_hard!r}: expected a bool or "
                    "'straight_through'")
  if cfg.attention_hard is True and multiplier != 1.0:
    raise ValueError(f"{owner}.attention_hard=True with attention_scale_multiplier="
                     f"{multiplier!r}: the arg-max does not depend on the scale; leave "
                     "the multiplier at 1.0")


def attention_scale(multiplier: float, head_dim: int) -> float | None:
  """``multiplier / sqrt(head_dim)``, or None (the attention default) for 1.0."""
  if multiplier == 1.0:
    return None
  return float(multiplier) / math.sqrt(head_dim)


def residual(config: BlockConfig, x: Array, fn: Callable[[Array], Array],
             norm_name: str, deterministic: bool,
             act_axes: tuple[str, ...] | None = _ACT_AXES) -> Array:
  """Pre-LN ``x + drop(fn(LN(x)))`` or post-LN ``LN(x + drop(fn(x)))``: the residual
  of every block (called inside a compact module; ``act_axes`` constrain the output,
  None for inputs that are not ``[batch, length, embed]``)."""
  pre = config.norm == "pre"
  norm = config.make_norm(norm_name)
  y = fn(norm(x) if pre else x)
  y = nn.Dropout(config.dropout_rate)(y, deterministic=deterministic)
  out = x + y.astype(x.dtype)
  if not pre:
    out = norm(out)
  return out if act_axes is None else nn.with_logical_constraint(out, act_axes)


class _Block(nn.Module):
  """Shared pieces: attention / MLP constructors and the pre/post-LN residual.

  ``rotary``: RoPE (``config.rotary_base``) on q and k of self attention; set by the
  model from its ``positions``.
  """
  config: BlockConfig
  rotary: bool = False

  def _attention(self, name: str, decode: bool, features: int) -> MultiHeadAttention:
    """The attention sublayer for query inputs ``[..., features]``."""
    rotary = self.rotary and name == "self_attention"
    return MultiHeadAttention(decode=decode, name=name,
                              **self.config.attention_kwargs(features, rotary=rotary))

  def _residual(self, x_BLD: Array, fn, norm_name: str, deterministic: bool) -> Array:
    return residual(self.config, x_BLD, fn, norm_name, deterministic)

  def _attend(self, module: MultiHeadAttention, *args, **kwargs) -> Array:
    out = module(*args, return_weights=self.config.return_weights, **kwargs)
    return out[0] if self.config.return_weights else out

  def _mlp(self, x_BLD: Array, deterministic: bool) -> Array:
    c = self.config
    return MLP(c.mlp_dim, activation=c.activation, use_bias=c.use_bias, dtype=c.dtype,
               param_dtype=c.param_dtype, name="mlp", **c.kernel_init(),
               **c.out_kernel_init())(x_BLD, deterministic)


class EncoderBlock(_Block):
  """Bidirectional self attention + MLP.

  ``__call__(x [B, L, D], mask, segment_ids, positions, deterministic) -> [B, L, D]``
  (all positional, so ``nn.remat``/``nn.scan`` can treat ``deterministic`` as static).
  ``mask``: bool broadcastable to ``[B, H, L, L]`` or None; ``segment_ids``: int
  ``[B, L]`` or None (packed sequences); ``positions``: int ``[B, L]`` (RoPE) or None.
  Params: ``attention_norm``, ``self_attention``, ``mlp_norm``, ``mlp``.
  """

  @nn.compact
  def __call__(self, x_BLD: Array, mask: Array | None = None,
               segment_ids: Array | None = None, positions: Array | None = None,
               deterministic: bool = True) -> Array:
    attn = self._attention("self_attention", decode=False, features=x_BLD.shape[-1])
    x_BLD = self._residual(
        x_BLD, lambda h: self._attend(attn, h, mask=mask, segment_ids=segment_ids,
                                      positions=positions, deterministic=deterministic),
        "attention_norm", deterministic)
    return self._residual(x_BLD, lambda h: self._mlp(h, deterministic), "mlp_norm",
                          deterministic)


class DecoderBlock(_Block):
  """Causal self attention, optional cross attention over ``encoded``, MLP.

  ``__call__(x [B, L, D], encoded [B, S, De] | None, self_mask, cross_mask, segment_ids,
  encoded_segment_ids, positions, deterministic) -> [B, L, D]``.
  ``cross_attention=True`` creates the cross-attention sublayer (``encoded`` required);
  self attention is causal (``is_causal=True``) and uses the KV cache when
  ``config.decode``; cross attention recomputes keys from ``encoded`` each call.
  ``cross_mask``: bool broadcastable to ``[B, H, L, S]`` (source padding).
  """
  cross_attention: bool = False

  @nn.compact
  def __call__(self, x_BLD: Array, encoded: Array | None = None,
               self_mask: Array | None = None, cross_mask: Array | None = None,
               segment_ids: Array | None = None, encoded_segment_ids: Array | None = None,
               positions: Array | None = None, deterministic: bool = True) -> Array:
    c = self.config
    if self.cross_attention and encoded is None:
      raise ValueError("DecoderBlock(cross_attention=True) needs `encoded`")
    attn = self._attention("self_attention", decode=c.decode, features=x_BLD.shape[-1])
    x_BLD = self._residual(
        x_BLD, lambda h: self._attend(attn, h, mask=self_mask, is_causal=True,
                                      segment_ids=segment_ids, positions=positions,
                                      deterministic=deterministic),
        "attention_norm", deterministic)
    if self.cross_attention:
      cross = self._attention("cross_attention", decode=False, features=x_BLD.shape[-1])
      cross_ids = None
      if segment_ids is not None and encoded_segment_ids is not None:
        cross_ids = (segment_ids, encoded_segment_ids)
      x_BLD = self._residual(
          x_BLD, lambda h: self._attend(cross, h, encoded, mask=cross_mask,
                                        segment_ids=cross_ids,
                                        deterministic=deterministic),
          "cross_attention_norm", deterministic)
    return self._residual(x_BLD, lambda h: self._mlp(h, deterministic), "mlp_norm",
                          deterministic)
