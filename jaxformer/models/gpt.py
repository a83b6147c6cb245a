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
Incremental decoding: ``GPT(gpt_nano(decode=True))`` (the one switch:
``cfg.block.decode``); ``init`` with a full-length input sizes the 'cache' collection,
then each ``apply(..., mutable=['cache'])`` appends the given tokens (usually one per
step) and returns their logits. Attention weights per layer: ``block.return_weights=True``
and ``apply(..., mutable=['intermediates'])``.
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
from jaxformer.layers.mlp import dense
from jaxformer.models import common

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class GPTConfig:
  """GPT hyper-parameters (defaults: GPT-2 small); block fields live in ``block``.

  Attributes:
    vocab_size: input vocabulary.
    max_len: context length (rows of the learned position table; KV cache size bound).
    num_layers / embed_dim: depth and width.
    positions: "learned" | "sinusoidal" | "rotary" (RoPE in attention, base
      ``block.rotary_base``) | "none".
    scale_embeddings: token table at stddev ``embed_dim**-0.5``, looked up times
      ``sqrt(embed_dim)`` (the Transformer's convention); None (default) = on exactly
      when ``positions == "sinusoidal"`` (see ``common.embeddings_scaled``).
    tie_embeddings: LM head = token embedding transposed (GPT-2: yes).
    output_vocab_size: rows of an untied head (None = vocab_size); only when untied.
    scaled_residual_init: initialise the residual-output projections (attention ``out``,
      MLP ``wo``; nanoGPT's ``c_proj``) with stddev ``block.init_stddev / sqrt(2 *
      num_layers)`` as GPT-2 and nanoGPT do (GPT-2: yes); False = like the rest (or
      ``block.residual_init_stddev`` when set, which must then be None here).
    vocab_pad_multiple: the embedding table and the output projection get their rows
      rounded up to a multiple of this; 1 = no padding; None (the default) = what the
      hardware and the mesh need (:func:`jaxformer.models.common.vocab_pad_multiple`):
      128 on GPU/TPU (matmuls tile well, every tensor-parallel size divides it), on a
      CPU only the vocabulary's tensor-parallel split, if any. The training loop
      resolves None for its mesh (and records the number with the run); a model built
      on its own uses the default backend, unsharded. The padded rows are never looked
      up and the logits are sliced back to the real vocabulary, so losses and
      sampling never see them. :func:`jaxformer.models.num_params` reports the count
      without them.
    remat / scan_layers: ``nn.remat`` each block / ``nn.scan`` over blocks.
    block: the blocks (``BlockConfig``): heads, MLP, norms, dropout (also used on the
      embeddings), attention options, ``init_stddev`` (also the embeddings'; None ->
      0.02), ``decode`` (KV-cache decoding), ``return_weights``, dtypes (logits are
      always float32).
  """
  vocab_size: int = 50257
  max_len: int = 1024
  num_layers: int = 12
  embed_dim: int = 768
  positions: str = "learned"
  scale_embeddings: bool | None = None
  tie_embeddings: bool = True
  output_vocab_size: int | None = None
  scaled_residual_init: bool = True
  vocab_pad_multiple: int | None = None
  remat: bool = False
  scan_layers: bool = False
  block: BlockConfig = dataclasses.field(default_factory=lambda: BlockConfig(
      num_heads=12, mlp_dim=3072, activation="gelu", norm="pre", init_stddev=0.02))

  def __post_init__(self):
    common.check_common(self)
    common.check_positive(self, "vocab_size", "max_len")
    if self.vocab_pad_multiple is not None:
      common.check_positive(self, "vocab_pad_multiple")
    if not isinstance(self.num_layers, int) or self.num_layers < 0:
      raise ValueError(f"GPTConfig.num_layers={self.num_layers!r}: expected an int >= 0")
    if not isinstance(self.scaled_residual_init, bool):
      raise TypeError(f"GPTConfig.scaled_residual_init={self.scaled_residual_init!r}: "
                      "expected a bool")
    if self.scaled_residual_init and self.block.residual_init_stddev is not None:
      raise ValueError("GPTConfig.scaled_residual_init=True derives "
                       "block.residual_init_stddev; set one of them, not both (got "
                       f"block.residual_init_stddev={self.block.residual_init_stddev})")
    if self.tie_embeddings and self.output_vocab_size not in (None, self.vocab_size):
      raise ValueError(f"GPTConfig.output_vocab_size={self.output_vocab_size} needs "
                       "tie_embeddings=False (a tied head has vocab_size rows)")

  @property
  def init_stddev(self) -> float:
    """Stddev of the embeddings and (through the block) of the kernels."""
    return 0.02 if self.block.init_stddev is None else self.block.init_stddev

  @property
  def out_vocab(self) -> int:
    return self.output_vocab_size or self.vocab_size

  def padded(self, size: int) -> int:
    """``size`` rounded up to ``vocab_pad_multiple`` (None: see its docstring)."""
    return common.padded_size(size, self.vocab_pad_multiple)

  def num_padding_params(self) -> int:
    """Parameters in the padded vocabulary rows (left out of reported counts)."""
    rows = self.padded(self.vocab_size) - self.vocab_size
    if not self.tie_embeddings:
      rows += self.padded(self.out_vocab) - self.out_vocab
    return rows * self.embed_dim

  def block_config(self) -> BlockConfig:
    """The block the stack runs: ``block`` with the initialisers GPT derives."""
    residual = self.block.residual_init_stddev
    if self.scaled_residual_init:
      residual = self.init_stddev / math.sqrt(2 * max(self.num_layers, 1))
    return dataclasses.replace(self.block, init_stddev=self.init_stddev,
                               residual_init_stddev=residual)


class GPT(nn.Module):
  """Decoder-only LM: ``tokens [B, L] -> float32 logits [B, L, V]``.

  Params: ``token_embedding`` (``[padded V, D]``), ``position_embedding`` (learned),
  ``decoder`` (``layers_i`` or scanned ``layers``, ``final_norm`` when pre-LN),
  ``lm_head`` (untied, ``[D, padded V_out]``).
  """
  config: GPTConfig

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
      float32 logits [batch, length, vocab] (the real vocabulary, padding sliced off).
    """
    cfg = self.config
    block = cfg.block_config()
    decode = block.decode
    common.check_tokens("inputs", inputs_BL, max_length=cfg.max_len)
    if decode and segment_ids is not None:
      raise ValueError("GPT: segment_ids are not supported with block.decode=True")
    if positions is None:
      if decode:
        positions = common.DecodePositions(name="decode_positions")(inputs_BL)
      elif segment_ids is not None:
        positions = embeddings.positions_from_segment_ids(segment_ids)
      else:
        positions = embeddings.default_positions(inputs_BL)

    kw = dict(dtype=block.dtype, param_dtype=block.param_dtype)
    init = nn.initializers.normal(cfg.init_stddev)
    embed = common.token_embedding(cfg, cfg.padded(cfg.vocab_size),
                                   stddev=cfg.init_stddev, name="token_embedding", **kw)
    x_BLD = common.add_positions(embed(inputs_BL), positions, cfg, cfg.max_len)
    x_BLD = nn.Dropout(block.dropout_rate)(x_BLD, deterministic=deterministic)
    x_BLD = common.constrain(x_BLD)

    x_BLD = Stack(DecoderBlock, block, cfg.num_layers, remat=cfg.remat,
                  scan=cfg.scan_layers, block_kwargs={"rotary": cfg.positions == "rotary"},
                  name="decoder")(x_BLD, None, mask, None, segment_ids, None, positions,
                                  deterministic=deterministic)
    if cfg.tie_embeddings:
      logits_BLV = embed.attend(x_BLD)
    else:
      head = dense(cfg.padded(cfg.out_vocab), axes.EMBED, axes.VOCAB, use_bias=False,
                   kernel_init=init, name="lm_head", **kw)
      logits_BLV = head(x_BLD).astype(jnp.float32)
    logits_BLV = common.constrain(logits_BLV,
                                  (axes.ACT_BATCH, axes.ACT_LENGTH, axes.ACT_VOCAB))
    # The padded rows' logits are dropped here, so no loss or sampler can see them.
    return logits_BLV[..., :cfg.out_vocab]


# --- presets ----------------------------------------------------------------------------

def gpt2_small(**overrides: Any) -> GPTConfig:
  """GPT-2 small (124M): 12 x 768, 12 heads, ctx 1024, vocab 50257, dropout 0.1."""
  cfg = common.replace(GPTConfig(), dropout_rate=0.1, attention_dropout_rate=0.1)
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
  cfg = common.replace(GPTConfig(), vocab_size=263, max_len=64, num_layers=4,
                       embed_dim=128, num_heads=4, mlp_dim=512)
  return common.replace(cfg, **overrides)


def gpt_tiny(**overrides: Any) -> GPTConfig:
  """Test-sized: 2 layers x 32 wide, 2 heads, ctx 16, vocab 64."""
  cfg = common.replace(GPTConfig(), vocab_size=64, max_len=16, num_layers=2,
                       embed_dim=32, num_heads=2, mlp_dim=64)
  return common.replace(cfg, **overrides)
