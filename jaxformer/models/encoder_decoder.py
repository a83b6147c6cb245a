"""EncoderDecoder: the original Transformer ("Attention Is All You Need").

```python
cfg = transformer_base()                    # 6 + 6 layers, 512 wide, 8 heads, FFN 2048
model = EncoderDecoder(cfg)
variables = model.init(rng, source_BS, target_inputs_BT)
logits_BTV = model.apply(variables, source_BS, target_inputs_BT, source_mask=src_valid_BS)
# separately (e.g. for generation):
encoded_BSD = model.apply(variables, source_BS, source_mask=src_valid_BS,
                          method=EncoderDecoder.encode)
logits_BTV = model.apply(variables, encoded_BSD, target_inputs_BT,
                         source_mask=src_valid_BS, method=EncoderDecoder.decode)
```
KV-cache decoding: ``EncoderDecoder(transformer_tiny(decode=True))`` (``block.decode``,
the one switch); ``init`` with a
full-length target sizes the cache; then call ``decode`` with one target token per step
and ``mutable=['cache']`` (cross attention recomputes its keys from ``encoded``).
``target_inputs`` are the targets shifted right (BOS first).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxformer import axes
from jaxformer.attention import masks
from jaxformer.layers import embeddings
from jaxformer.layers.blocks import BlockConfig, DecoderBlock, EncoderBlock, Stack
from jaxformer.layers.mlp import dense
from jaxformer.models import common

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class EncoderDecoderConfig:
  """Encoder-decoder hyper-parameters (defaults: Transformer base).

  Attributes:
    vocab_size: shared vocabulary (used when source/target sizes are None).
    source_vocab_size / target_vocab_size: None = vocab_size.
    share_embeddings: one table for source and target tokens (needs equal vocabularies).
    tie_output: output projection = target embedding transposed.
    max_len: longest source/target (learned positions; the error check for inputs).
    num_encoder_layers / num_decoder_layers / embed_dim: depths and width.
    positions: "sinusoidal" (paper) | "learned" | "rotary" | "none".
    scale_embeddings: token tables at stddev ``embed_dim**-0.5``, looked up times
      ``sqrt(embed_dim)`` (the paper; the option every model shares, see
      ``common.embeddings_scaled``); True by default here whatever the positions (the
      paper's choice), False = normal(0.02) unscaled, None = on exactly with sinusoids.
    remat / scan_layers: as GPTConfig.
    block: ONE block config for the encoder and the decoder blocks (the paper uses the
      same sizes for both); relu, post-LN (no final LN; "pre" adds one to each stack),
      norm_eps 1e-6, dropout 0.1 (embeddings + every sublayer). ``block.decode`` turns on
      the KV cache of the decoder's self attention (the encoder never caches).
  """
  vocab_size: int = 32000
  source_vocab_size: int | None = None
  target_vocab_size: int | None = None
  share_embeddings: bool = True
  tie_output: bool = True
  max_len: int = 256
  num_encoder_layers: int = 6
  num_decoder_layers: int = 6
  embed_dim: int = 512
  positions: str = "sinusoidal"
  scale_embeddings: bool | None = True
  remat: bool = False
  scan_layers: bool = False
  block: BlockConfig = dataclasses.field(default_factory=lambda: BlockConfig(
      num_heads=8, mlp_dim=2048, activation="relu", norm="post", norm_eps=1e-6,
      dropout_rate=0.1))

  def __post_init__(self):
    common.check_common(self)
    common.check_positive(self, "vocab_size", "max_len")
    if self.share_embeddings and self.src_vocab != self.tgt_vocab:
      raise ValueError(
          f"EncoderDecoderConfig.share_embeddings=True needs equal vocabularies, got "
          f"source_vocab_size={self.src_vocab}, target_vocab_size={self.tgt_vocab}")

  @property
  def src_vocab(self) -> int:
    return self.source_vocab_size or self.vocab_size

  @property
  def tgt_vocab(self) -> int:
    return self.target_vocab_size or self.vocab_size


class EncoderDecoder(nn.Module):
  """``(source [B, S], target_inputs [B, T]) -> float32 logits [B, T, target_vocab]``.

  Params: ``source_embedding`` (also the target table when shared),
  ``target_embedding`` (separate), ``encoder``, ``decoder``, ``output`` (untied).
  """
  config: EncoderDecoderConfig

  def setup(self):
    cfg = self.config
    kw = dict(dtype=cfg.block.dtype, param_dtype=cfg.block.param_dtype)
    self.source_embedding = common.token_embedding(cfg, cfg.src_vocab, stddev=0.02,
                                                   name=None, **kw)
    if cfg.share_embeddings:
      self.target_embedding = self.source_embedding
    else:
      self.target_embedding = common.token_embedding(cfg, cfg.tgt_vocab, stddev=0.02,
                                                     name=None, **kw)
    if cfg.positions == "learned":
      self.source_positions = embeddings.LearnedPositionEmbed(cfg.max_len, cfg.embed_dim,
                                                              **kw)
      self.target_positions = embeddings.LearnedPositionEmbed(cfg.max_len, cfg.embed_dim,
                                                              **kw)
    rotary = cfg.positions == "rotary"
    self.encoder = Stack(EncoderBlock, cfg.block, cfg.num_encoder_layers,
                         remat=cfg.remat, scan=cfg.scan_layers,
                         block_kwargs={"rotary": rotary})
    self.decoder = Stack(DecoderBlock, cfg.block, cfg.num_decoder_layers, remat=cfg.remat,
                         scan=cfg.scan_layers,
                         block_kwargs={"cross_attention": True, "rotary": rotary})
    if not cfg.tie_output:
      self.output = dense(cfg.tgt_vocab, axes.EMBED, axes.VOCAB, use_bias=False,
                          kernel_init=nn.initializers.xavier_uniform(), **kw)
    self.embedding_dropout = nn.Dropout(cfg.block.dropout_rate)
    if cfg.block.decode:
      self.decode_positions = common.DecodePositions()

  def _add_positions(self, x_BLD: Array, positions_BL: Array, learned) -> Array:
    cfg = self.config
    if cfg.positions == "learned":
      return x_BLD + learned(positions_BL).astype(x_BLD.dtype)
    if cfg.positions == "sinusoidal":
      return x_BLD + embeddings.sinusoidal_embedding(positions_BL, cfg.embed_dim,
                                                     dtype=x_BLD.dtype)
    return x_BLD

  def encode(self, source_BS: Array, source_mask: Array | None = None,
             source_positions: Array | None = None,
             source_segment_ids: Array | None = None,
             deterministic: bool = True) -> Array:
    """source: int [B, S]; source_mask: [B, S] True = real token -> encoded [B, S, D]."""
    cfg = self.config
    common.check_tokens("source", source_BS, max_length=cfg.max_len)
    if source_positions is None:
      source_positions = (embeddings.default_positions(source_BS)
                          if source_segment_ids is None
                          else embeddings.positions_from_segment_ids(source_segment_ids))
    x_BSD = self._add_positions(self.source_embedding(source_BS), source_positions,
                                getattr(self, "source_positions", None))
    x_BSD = common.constrain(self.embedding_dropout(x_BSD, deterministic=deterministic))
    mask = None if source_mask is None else masks.make_key_mask(source_mask)
    return self.encoder(x_BSD, mask, source_segment_ids, source_positions,
                        deterministic=deterministic)

  def decode(self, encoded_BSD: Array, target_inputs_BT: Array,
             source_mask: Array | None = None, target_positions: Array | None = None,
             target_segment_ids: Array | None = None,
             source_segment_ids: Array | None = None,
             deterministic: bool = True) -> Array:
    """encoded [B, S, D], target_inputs int [B, T] -> float32 logits [B, T, V]."""
    cfg = self.config
    common.check_tokens("target_inputs", target_inputs_BT, max_length=cfg.max_len)
    if cfg.block.decode and target_segment_ids is not None:
      raise ValueError("EncoderDecoder: target_segment_ids are not supported with "
                       "block.decode=True")
    if target_positions is None:
      if cfg.block.decode:
        target_positions = self.decode_positions(target_inputs_BT)
      elif target_segment_ids is not None:
        target_positions = embeddings.positions_from_segment_ids(target_segment_ids)
      else:
        target_positions = embeddings.default_positions(target_inputs_BT)
    y_BTD = self._add_positions(self.target_embedding(target_inputs_BT), target_positions,
                                getattr(self, "target_positions", None))
    y_BTD = common.constrain(self.embedding_dropout(y_BTD, deterministic=deterministic))
    cross_mask = None if source_mask is None else masks.make_key_mask(source_mask)
    y_BTD = self.decoder(y_BTD, encoded_BSD, None, cross_mask, target_segment_ids,
                         source_segment_ids, target_positions,
                         deterministic=deterministic)
    if cfg.tie_output:
      logits_BTV = self.target_embedding.attend(y_BTD)
    else:
      logits_BTV = self.output(y_BTD).astype(jnp.float32)
    return common.constrain(logits_BTV, (axes.ACT_BATCH, axes.ACT_LENGTH, axes.ACT_VOCAB))

  def __call__(self, source_BS: Array, target_inputs_BT: Array,
               source_mask: Array | None = None, source_positions: Array | None = None,
               target_positions: Array | None = None,
               source_segment_ids: Array | None = None,
               target_segment_ids: Array | None = None,
               deterministic: bool = True) -> Array:
    """Encodes then decodes; logits [B, T, target_vocab] float32."""
    encoded_BSD = self.encode(source_BS, source_mask, source_positions, source_segment_ids,
                              deterministic=deterministic)
    return self.decode(encoded_BSD, target_inputs_BT, source_mask, target_positions,
                       target_segment_ids, source_segment_ids, deterministic=deterministic)


# --- presets ----------------------------------------------------------------------------

def transformer_base(**overrides: Any) -> EncoderDecoderConfig:
  """Transformer base (Vaswani et al. 2017): 6 + 6 layers, 512 wide, 8 heads, FFN 2048."""
  return common.replace(EncoderDecoderConfig(), **overrides)


def transformer_big(**overrides: Any) -> EncoderDecoderConfig:
  """Transformer big: 1024 wide, 16 heads, FFN 4096, dropout 0.3."""
  sizes = dict(embed_dim=1024, num_heads=16, mlp_dim=4096, dropout_rate=0.3)
  return transformer_base(**{**sizes, **overrides})


def transformer_tiny(**overrides: Any) -> EncoderDecoderConfig:
  """Test-sized: 2 + 2 layers x 32 wide, 2 heads, vocab 64, max_len 16, no dropout."""
  cfg = common.replace(EncoderDecoderConfig(), vocab_size=64, max_len=16,
                       num_encoder_layers=2, num_decoder_layers=2, embed_dim=32,
                       num_heads=2, mlp_dim=64, dropout_rate=0.0)
  return common.replace(cfg, **overrides)
