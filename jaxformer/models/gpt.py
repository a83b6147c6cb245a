"""GPT: a decoder-only, causal language model (GPT-2 layout by default).

```python
cfg = gpt2_small()                       # or gpt_nano() for the CPU target
model = GPT(cfg)
variables = model.init(rng, tokens_BL)   # {'params': ...}
logits_BLV = model.apply(variables, tokens_BL, segment_ids=None, positions=None,
                         deterministic=False, rngs={'dropout': key})
```
Packed sequences: pass ``segment_ids`` (attention stays inside a document) and
``positions`` (reset per document; derived from ``segment_ids`` when omitted).
Incremental decoding: ``GPT(cfg, decode=True)`` (or ``cfg.decode=True``); ``init`` with a
full-length input sizes the 'cache' collection, then each ``apply(..., mutable=['cache'])``
appends the given tokens (usually one per step) and returns their logits.
Attention weights per layer: ``cfg.return_weights=True`` and
``apply(..., mutable=['intermediates'])``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxformer import axes
from jaxformer.layers import embeddings
from jaxformer.layers.blocks import BlockConfig, DecoderBlock, Stack
from jaxformer.layers.mlp import check_activation, dense
from jaxformer.models import common

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class GPTConfig:
  """GPT hyper-parameters (defaults: GPT-2 small).

  Attributes:
    vocab_size: input vocabulary.
    max_len: context length (rows of the learned position table; KV cache size bound).
    num_layers / embed_dim / num_heads / mlp_dim: depth, width, heads, FFN width.
    num_kv_heads: grouped-query attention (None = num_heads); head_dim: None = D / H.
    activation: "gelu" (tanh approx., GPT-2), "gelu_exact", "relu", "swiglu", "geglu".
    norm: "pre" (GPT-2, with a final LN) or "post"; norm_type: "layernorm" | "rmsnorm".
    positions: "learned" | "sinusoidal" | "rotary" (RoPE in attention) | "none".
    rotary_base: RoPE base when positions == "rotary".
    use_bias: biases in every projection (GPT-2: yes).
    tie_embeddings: LM head = token embedding transposed (GPT-2: yes).
    output_vocab_size: rows of an untied head (None = vocab_size); only when untied.
    dropout_rate: on embeddings and every sublayer output; attention_dropout_rate: on
      attention weights.
    init_stddev: normal init of kernels and embeddings.
    scaled_residual_init: initialise the residual-output projections (attention ``out``,
      MLP ``wo``; nanoGPT's ``c_proj``) with stddev ``init_stddev / sqrt(2 * num_layers)``
      as GPT-2 and nanoGPT do (GPT-2: yes); False = ``init_stddev`` like the rest.
      Changes no shapes or parameter counts.
    attention_impl: None | "xla" | "chunked" | "pallas" | "cudnn".
    attention_scale_multiplier: inverse temperature of every attention as a multiple of
      the usual ``1/sqrt(head_dim)`` (1.0: standard; 0: uniform over the allowed keys).
    attention_hard: arg-max attention in every layer (gradients reach the values only,
      not the queries/keys; forces the xla path). Needs attention_scale_multiplier=1.
    remat / scan_layers: ``nn.remat`` each block / ``nn.scan`` over blocks.
    decode: KV-cache decoding (same as ``GPT(cfg, decode=True)``).
    return_weights: sow attention weights into 'intermediates'.
    dtype / param_dtype: compute / parameter dtypes (logits are always float32).
  """
  vocab_size: int = 50257
  max_len: int = 1024
  num_layers: int = 12
  embed_dim: int = 768
  num_heads: int = 12
  mlp_dim: int = 3072
  num_kv_heads: int | None = None
  head_dim: int | None = None
  activation: str = "gelu"
  norm: str = "pre"
  norm_type: str = "layernorm"
  norm_eps: float = 1e-5
  positions: str = "learned"
  rotary_base: float = 10_000.0
  use_bias: bool = True
  tie_embeddings: bool = True
  output_vocab_size: int | None = None
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  init_stddev: float = 0.02
  scaled_residual_init: bool = True
  attention_impl: str | None = None
  attention_scale_multiplier: float = 1.0
  attention_hard: bool = False
  remat: bool = False
  scan_layers: bool = False
  decode: bool = False
  return_weights: bool = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def __post_init__(self):
    common.check_common(self)
    check_activation(self.activation, field="GPTConfig.activation")
    if not isinstance(self.scaled_residual_init, bool):
      raise TypeError(f"GPTConfig.scaled_residual_init={self.scaled_residual_init!r}; "
                      "expected a bool")
    if self.tie_embeddings and self.output_vocab_size not in (None, self.vocab_size):
      raise ValueError(f"GPTConfig.output_vocab_size={self.output_vocab_size} needs "
                       "tie_embeddings=False (a tied head has vocab_size rows)")

  @property
  def residual_init_stddev(self) -> float:
    """Stddev of the residual-output projections (see ``scaled_residual_init``)."""
    if not self.scaled_residual_init:
      return self.init_stddev
    return self.init_stddev / math.sqrt(2 * max(self.num_layers, 1))

  def block_config(self, decode: bool = False) -> BlockConfig:
    return BlockConfig(
        num_heads=self.num_heads, mlp_dim=self.mlp_dim, num_kv_heads=self.num_kv_heads,
        head_dim=self.head_dim, activation=self.activation, norm=self.norm,
        norm_type=self.norm_type, norm_eps=self.norm_eps, use_bias=self.use_bias,
        dropout_rate=self.dropout_rate, attention_dropout_rate=self.attention_dropout_rate,
        rotary_base=self.rotary_base if self.positions == "rotary" else None,
        attention_impl=self.attention_impl,
        attention_scale_multiplier=self.attention_scale_multiplier,
        attention_hard=self.attention_hard, decode=decode or self.decode,
        return_weights=self.return_weights, init_stddev=self.init_stddev,
        residual_init_stddev=self.residual_init_stddev, dtype=self.dtype,
        param_dtype=self.param_dtype)


class GPT(nn.Module):
  """Decoder-only LM: ``tokens [B, L] -> float32 logits [B, L, V]``.

  Params: ``token_embedding``, ``position_embedding`` (learned), ``decoder``
  (``layers_i`` or scanned ``layers``, ``final_norm`` when pre-LN), ``lm_head`` (untied).
  """
  config: GPTConfig
  decode: bool = False

  @nn.compact
  def __call__(self, inputs_BL: Array, segment_ids: Array | None = None,
               positions: Array | None = None, deterministic: bool = True,
               mask: Array | None = None) -> Array:
    """Args:
      inputs_BL: int token ids [batch, length].
      segment_ids: int [batch, length] document ids of packed rows (or None).
      positions: int [batch, length] (None: from segment_ids / arange / the cache).
      deterministic: False enables dropout (needs rngs={'dropout': key}).
      mask: optional extra bool self-attention mask, broadcastable to
        [batch, heads, length, kv_length] (kv_length = max_len of the cache when
        decoding), e.g. to hide the left padding of batched prompts; ANDed with causality.
    Returns:
      float32 logits [batch, length, vocab].
    """
    cfg = self.config
    decode = self.decode or cfg.decode
    common.check_tokens("inputs", inputs_BL, max_length=cfg.max_len)
    if decode and segment_ids is not None:
      raise ValueError("GPT: segment_ids are not supported with decode=True")
    if positions is None:
      if decode:
        positions = common.DecodePositions(name="decode_positions")(inputs_BL)
      elif segment_ids is not None:
        positions = embeddings.positions_from_segment_ids(segment_ids)
      else:
        positions = embeddings.default_positions(inputs_BL)

    embed = embeddings.Embed(
        cfg.vocab_size, cfg.embed_dim, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
        embedding_init=nn.initializers.normal(cfg.init_stddev), name="token_embedding")
    x_BLD = common.add_positions(embed(inputs_BL), positions, cfg, cfg.max_len)
    x_BLD = nn.Dropout(cfg.dropout_rate)(x_BLD, deterministic=deterministic)
    x_BLD = common.constrain(x_BLD)

    x_BLD = Stack(DecoderBlock, cfg.block_config(decode), cfg.num_layers,
                  remat=cfg.remat, scan=cfg.scan_layers, name="decoder")(
                      x_BLD, None, mask, None, segment_ids, None, positions,
                      deterministic=deterministic)
    if cfg.tie_embeddings:
      logits_BLV = embed.attend(x_BLD)
    else:
      head = dense(cfg.output_vocab_size or cfg.vocab_size, axes.EMBED, axes.VOCAB,
                   use_bias=False, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                   kernel_init=nn.initializers.normal(cfg.init_stddev), name="lm_head")
      logits_BLV = head(x_BLD).astype(jnp.float32)
    return common.constrain(logits_BLV, (axes.ACT_BATCH, axes.ACT_LENGTH, axes.ACT_VOCAB))


# --- presets ----------------------------------------------------------------------------

def gpt2_small(**overrides: Any) -> GPTConfig:
  """GPT-2 small (124M): 12 x 768, 12 heads, ctx 1024, vocab 50257, dropout 0.1."""
  cfg = GPTConfig(dropout_rate=0.1, attention_dropout_rate=0.1)
  return common.replace(cfg, **overrides)


def gpt2_medium(**overrides: Any) -> GPTConfig:
  """GPT-2 medium (355M): 24 x 1024, 16 heads."""
  sizes = dict(num_layers=24, embed_dim=1024, num_heads=16, mlp_dim=4096)
  return gpt2_small(**{**sizes, **overrides})


def gpt2_large(**overrides: Any) -> GPTConfig:
  """GPT-2 large (774M): 36 x 1280, 20 heads."""
  sizes = dict(num_layers=36, embed_dim=1280, num_heads=20, mlp_dim=5120)
  return gpt2_small(**{**sizes, **overrides})


def gpt2_xl(**overrides: Any) -> GPTConfig:
  """GPT-2 XL (1.5B): 48 x 1600, 25 heads."""
  sizes = dict(num_layers=48, embed_dim=1600, num_heads=25, mlp_dim=6400)
  return gpt2_small(**{**sizes, **overrides})


def gpt_nano(**overrides: Any) -> GPTConfig:
  """The CPU target: 4 layers x 128 wide, 4 heads, ctx 64, byte-level vocab.

  ``vocab_size=263`` is ``ByteTokenizer``'s 256 bytes + 7 special tokens; override it to
  match another tokenizer.
  """
  cfg = GPTConfig(vocab_size=263, max_len=64, num_layers=4, embed_dim=128, num_heads=4,
                  mlp_dim=512)
  return common.replace(cfg, **overrides)


def gpt_tiny(**overrides: Any) -> GPTConfig:
  """Test-sized: 2 layers x 32 wide, 2 heads, ctx 16, vocab 64."""
  cfg = GPTConfig(vocab_size=64, max_len=16, num_layers=2, embed_dim=32, num_heads=2,
                  mlp_dim=64)
  return common.replace(cfg, **overrides)
