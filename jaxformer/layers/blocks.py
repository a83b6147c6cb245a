"""Transformer blocks (encoder, decoder) and a layer ``Stack`` with remat / scan.

Placement of the norm (``BlockConfig.norm``):
  * ``"post"`` (original Transformer, BERT): ``x = LN(x + dropout(f(x)))``;
  * ``"pre"``  (GPT-2, ViT): ``x = x + dropout(f(LN(x)))``, and the ``Stack`` ends with a
    final LN (``final_norm``).
Dropout sits where the papers put it: on attention weights (inside attention), and on
each sublayer's output before the residual add; embedding dropout is the model's job.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxformer import axes
from jaxformer.attention import MultiHeadAttention
from jaxformer.layers.mlp import MLP, check_activation
from jaxformer.layers.norms import check_norm, make_norm

Array = jax.Array
Dtype = Any

_ACT_AXES = (axes.ACT_BATCH, axes.ACT_LENGTH, axes.ACT_EMBED)


@dataclasses.dataclass(frozen=True)
class BlockConfig:
  """Everything one transformer block needs; models build it from their own config.

  Attributes:
    num_heads: query heads.
    mlp_dim: feed-forward hidden width.
    num_kv_heads: key/value heads (grouped-query attention); None = num_heads.
    head_dim: per-head width; None = features // num_heads.
    activation: MLP activation, see ``jaxformer.layers.mlp.ACTIVATIONS``.
    norm: ``"pre"`` or ``"post"``.
    norm_type: ``"layernorm"`` or ``"rmsnorm"``.
    norm_eps: epsilon of the norms.
    use_bias: biases in attention and MLP projections.
    dropout_rate: dropout on each sublayer's output (before the residual add).
    attention_dropout_rate: dropout on attention weights.
    rotary_base: not None -> RoPE on q and k in self attention.
    attention_impl: ``implementation`` of ``dot_product_attention``.
    attention_scale_multiplier: the attention logits' inverse temperature as a multiple
      of the usual ``1/sqrt(head_dim)``: ``beta = attention_scale_multiplier /
      sqrt(head_dim)`` (0 = uniform attention over the allowed keys; large = towards
      arg-max). 1.0 (default) is the standard scaled dot product.
    attention_hard: arg-max (hard) attention: each query takes the value of its
      best-scoring allowed key. No gradient reaches the queries and keys (the weights
      are a step function of them), only the values; runs on the xla path.
    decode: incremental decoding (self attention keeps a KV cache in 'cache').
    return_weights: sow attention weights into 'intermediates'.
    init_stddev: None -> the attention/MLP default initializers (xavier uniform);
      a float -> normal(stddev) kernels (GPT-2 / BERT use 0.02).
    residual_init_stddev: None -> the residual-output projections (attention ``out``
      and MLP ``wo``) are initialised like the other kernels; a float -> normal(stddev)
      for those two (GPT-2 / nanoGPT: ``init_stddev / sqrt(2 * num_layers)``).
  """
  num_heads: int
  mlp_dim: int
  num_kv_heads: int | None = None
  head_dim: int | None = None
  activation: str = "gelu"
  norm: str = "pre"
  norm_type: str = "layernorm"
  norm_eps: float = 1e-5
  use_bias: bool = True
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  rotary_base: float | None = None
  attention_impl: str | None = None
  attention_scale_multiplier: float = 1.0
  attention_hard: bool = False
  decode: bool = False
  return_weights: bool = False
  init_stddev: float | None = None
  residual_init_stddev: float | None = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def __post_init__(self):
    check_norm(self.norm, self.norm_type)
    check_activation(self.activation)
    for name in ("num_heads", "mlp_dim"):
      value = getattr(self, name)
      if not isinstance(value, int) or value <= 0:
        raise ValueError(f"BlockConfig.{name}={value!r}; expected a positive int")
    for name in ("dropout_rate", "attention_dropout_rate"):
      value = getattr(self, name)
      if not 0.0 <= value < 1.0:
        raise ValueError(f"BlockConfig.{name}={value!r}; expected 0 <= rate < 1")
    for name in ("init_stddev", "residual_init_stddev"):
      value = getattr(self, name)
      if value is not None and not value > 0:
        raise ValueError(f"BlockConfig.{name}={value!r}; expected None or a float > 0")
    check_attention_options(self, "BlockConfig")

  def attention_scale(self, features: int) -> float | None:
    """``scale`` of the attention modules for inputs ``[..., features]``.

    None (the default ``1/sqrt(head_dim)``) unless ``attention_scale_multiplier != 1``.
    """
    return attention_scale(self.attention_scale_multiplier,
                           self.head_dim or features // self.num_heads)

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


def check_attention_options(cfg: Any, owner: str) -> None:
  """Validates ``cfg.attention_scale_multiplier`` / ``cfg.attention_hard``.

  Normalises an int multiplier (e.g. from a command-line override) to float. Raises
  ValueError/TypeError naming ``owner.field``, the value and what would be valid.
  """
  multiplier = cfg.attention_scale_multiplier
  if (isinstance(multiplier, bool) or not isinstance(multiplier, (int, float))
      or not math.isfinite(multiplier) or multiplier < 0):
    raise ValueError(f"{owner}.attention_scale_multiplier={multiplier!r}; expected a "
                     "finite float >= 0 (1.0 = the usual 1/sqrt(head_dim))")
  object.__setattr__(cfg, "attention_scale_multiplier", float(multiplier))
  if not isinstance(cfg.attention_hard, bool):
    raise TypeError(f"{owner}.attention_hard={cfg.attention_hard!r}; expected a bool")
  if cfg.attention_hard and multiplier != 1.0:
    raise ValueError(f"{owner}.attention_hard=True with attention_scale_multiplier="
                     f"{multiplier!r}: the arg-max does not depend on the scale; leave "
                     "the multiplier at 1.0")


def attention_scale(multiplier: float, head_dim: int) -> float | None:
  """``multiplier / sqrt(head_dim)``, or None (the attention default) for 1.0."""
  if multiplier == 1.0:
    return None
  return float(multiplier) / math.sqrt(head_dim)


class _Block(nn.Module):
  """Shared pieces: attention / MLP constructors and the pre/post-LN residual."""
  config: BlockConfig

  def _attention(self, name: str, decode: bool, features: int) -> MultiHeadAttention:
    """The attention sublayer for query inputs ``[..., features]``."""
    c = self.config
    return MultiHeadAttention(
        num_heads=c.num_heads, num_kv_heads=c.num_kv_heads, head_dim=c.head_dim,
        use_bias=c.use_bias, dropout_rate=c.attention_dropout_rate,
        scale=c.attention_scale(features), hard=c.attention_hard,
        rotary_base=c.rotary_base if name == "self_attention" else None,
        implementation=c.attention_impl, decode=decode, dtype=c.dtype,
        param_dtype=c.param_dtype, name=name, **c.kernel_init(), **c.out_kernel_init())

  def _norm(self, name: str) -> nn.Module:
    c = self.config
    return make_norm(c.norm_type, eps=c.norm_eps, dtype=c.dtype,
                     param_dtype=c.param_dtype, name=name)

  def _residual(self, x_BLD: Array, fn, norm_name: str, deterministic: bool) -> Array:
    """Pre-LN ``x + drop(fn(LN(x)))`` or post-LN ``LN(x + drop(fn(x)))``."""
    c = self.config
    pre = c.norm == "pre"
    y_BLD = fn(self._norm(norm_name)(x_BLD) if pre else x_BLD)
    y_BLD = nn.Dropout(c.dropout_rate)(y_BLD, deterministic=deterministic)
    out_BLD = x_BLD + y_BLD.astype(x_BLD.dtype)
    if not pre:
      out_BLD = self._norm(norm_name)(out_BLD)
    return nn.with_logical_constraint(out_BLD, _ACT_AXES)

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


class Stack(nn.Module):
  """``num_layers`` blocks of one kind, optionally rematerialised and/or scanned.

  ``__call__(x, *block_args, deterministic=False|True)``: ``block_args`` are the block's
  positional arguments after ``x`` (e.g. ``mask, segment_ids, positions`` for
  ``EncoderBlock``), the same for every layer.

  Params: plain loop ``layers_0 .. layers_{n-1}``; ``scan=True`` -> one ``layers`` whose
  leaves are stacked along a leading ``LAYERS`` axis (convert with
  :func:`stack_layer_params` / :func:`unstack_layer_params`). ``final_norm`` (default: on
  for pre-LN) adds ``final_norm`` after the last block. Under ``scan`` the 'cache' and
  'intermediates' collections are stacked along the layer axis too.

  Attributes:
    block: ``EncoderBlock`` or ``DecoderBlock``.
    config: the blocks' config.
    num_layers: depth.
    remat: ``nn.remat`` each block (recompute activations in the backward pass).
    scan: ``nn.scan`` over layers (one traced block; faster compiles for deep stacks).
    block_kwargs: extra block attributes, e.g. ``{"cross_attention": True}``.
    final_norm: None -> ``config.norm == "pre"``.
  """
  block: Any
  config: BlockConfig
  num_layers: int
  remat: bool = False
  scan: bool = False
  block_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  final_norm: bool | None = None

  @nn.compact
  def __call__(self, x_BLD: Array, *block_args: Any, deterministic: bool = True) -> Array:
    if not isinstance(self.num_layers, int) or self.num_layers < 0:
      raise ValueError(f"Stack.num_layers={self.num_layers!r}; expected an int >= 0")
    block_cls = self.block
    args = (*block_args, deterministic)
    if self.remat:
      # static_argnums counts `self` as 0 and x as 1, so deterministic (the last of
      # `args`) is at 1 + len(args).
      block_cls = nn.remat(block_cls, prevent_cse=not self.scan,
                           static_argnums=(1 + len(args),))
    if self.scan and self.num_layers > 0:
      def body(module, carry, *xs):
        return module(carry, *xs), None

      scanned = nn.scan(
          body,
          variable_axes={"params": 0, "cache": 0, "intermediates": 0},
          split_rngs={"params": True, "dropout": True},
          in_axes=nn.broadcast,
          length=self.num_layers,
          metadata_params={nn.PARTITION_NAME: axes.LAYERS})
      layer = block_cls(self.config, name="layers", **self.block_kwargs)
      x_BLD, _ = scanned(layer, x_BLD, *args)
    else:
      for i in range(self.num_layers):
        x_BLD = block_cls(self.config, name=f"layers_{i}", **self.block_kwargs)(
            x_BLD, *args)
    use_final = self.config.norm == "pre" if self.final_norm is None else self.final_norm
    if use_final:
      x_BLD = make_norm(self.config.norm_type, eps=self.config.norm_eps,
                        dtype=self.config.dtype, param_dtype=self.config.param_dtype,
                        name="final_norm")(x_BLD)
    return x_BLD


_LAYER_KEY = re.compile(r"^layers_(\d+)$")


def _is_box(x: Any) -> bool:
  return isinstance(x, nn.Partitioned)


def _stack_leaves(*xs: Any) -> Any:
  if _is_box(xs[0]):  # keep logical names: prepend the LAYERS axis
    return xs[0].replace(value=jnp.stack([x.value for x in xs]),
                         names=(axes.LAYERS, *xs[0].names))
  return jnp.stack(xs)


def _index_leaf(x: Any, i: int) -> Any:
  if _is_box(x):
    return x.replace(value=x.value[i], names=tuple(x.names[1:]))
  return x[i]


def stack_layer_params(tree: Any) -> Any:
  """Plain-loop variables -> scanned layout (``layers_i`` dicts -> one stacked ``layers``).

  Works on any nested dict, e.g. a whole ``variables`` tree (boxed ``nn.Partitioned``
  leaves get the ``layers`` axis name prepended); every dict holding
  ``layers_0 .. layers_{n-1}`` is rewritten, other keys are kept.
  """
  if not isinstance(tree, Mapping):
    return tree
  out = {}
  layer_items = {}
  for key, value in tree.items():
    m = _LAYER_KEY.match(str(key))
    if m:
      layer_items[int(m.group(1))] = stack_layer_params(value)
    else:
      out[key] = stack_layer_params(value)
  if layer_items:
    if sorted(layer_items) != list(range(len(layer_items))):
      raise ValueError(f"layer keys are not contiguous: {sorted(layer_items)}")
    out["layers"] = jax.tree.map(_stack_leaves,
                                 *[layer_items[i] for i in range(len(layer_items))],
                                 is_leaf=_is_box)
  return out


def unstack_layer_params(tree: Any) -> Any:
  """Scanned variables -> plain-loop layout (inverse of :func:`stack_layer_params`)."""
  if not isinstance(tree, Mapping):
    return tree
  out = {}
  for key, value in tree.items():
    if key == "layers" and isinstance(value, Mapping):
      n = jax.tree.leaves(value)[0].shape[0]
      inner = unstack_layer_params(value)
      for i in range(n):
        out[f"layers_{i}"] = jax.tree.map(lambda x, i=i: _index_leaf(x, i), inner,
                                          is_leaf=_is_box)
    else:
      out[key] = unstack_layer_params(value)
  return out
