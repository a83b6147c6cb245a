"""BERT: a bidirectional post-LN encoder with token-type embeddings and optional heads.

```python
cfg = bert_base(mlm_head=True, nsp_head=True)
model = BERT(cfg)
variables = model.init(rng, input_ids_BL)
out = model.apply(variables, input_ids_BL, token_type_ids=types_BL,
                  attention_mask=valid_BL)          # 1/True = real token, 0 = padding
out["sequence"]    # [B, L, D] final hidden states
out["pooled"]      # [B, D]   tanh(dense(h[CLS])) ("cls"), or masked mean / max of h
out["mlm_logits"]  # [B, L, V] float32 (or [B, P, V] with mlm_positions [B, P])  if mlm_head
out["nsp_logits"]  # [B, 2]    float32                                           if nsp_head
out["logits"]      # [B, num_classes] float32                               if num_classes
```
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxformer import axes
from jaxformer.attention import masks
from jaxformer.layers import embeddings
from jaxformer.layers.blocks import BlockConfig, EncoderBlock, Stack
from jaxformer.layers.mlp import ACTIVATIONS, dense
from jaxformer.models import common

Array = jax.Array
POOLINGS = ("cls", "max", "mean", "max_of_logits")


@dataclasses.dataclass(frozen=True)
class BERTConfig:
  """BERT hyper-parameters (defaults: BERT-base, no heads); block fields in ``block``.

  Attributes:
    vocab_size / max_len: embedding table sizes.
    type_vocab_size: segment A/B table rows (0: no token-type embedding).
    num_layers / embed_dim: the encoder's depth and width.
    positions: "learned" (BERT) | "sinusoidal" | "rotary" | "none".
    scale_embeddings: token table at stddev ``embed_dim**-0.5``, looked up times
      ``sqrt(embed_dim)`` (the Transformer's convention); None (default) = on exactly
      when ``positions == "sinusoidal"`` (see ``common.embeddings_scaled``).
    mlm_head: masked-LM head (dense + activation + LN transform, tied decoder + bias).
    nsp_head: next-sentence head on the pooled output -> [B, 2].
    num_classes: > 0 adds a classifier -> [B, num_classes].
    pooling: how the classifier sees the sequence, in the NYU notes' order:
      "cls" (BERT pooler, tanh(dense(h[CLS]))) | "max" / "mean" (over real tokens,
      then the classifier) | "max_of_logits" (the classifier on every h_t, then the max
      over real tokens: ``max_t Linear(h_t)``; needs num_classes > 0, no NSP head;
      "pooled" is then the max of h).
    remat / scan_layers: as GPTConfig.
    block: the encoder blocks; BERT: gelu_exact, post-LN (plus a LN on the embeddings),
      norm_eps 1e-12, dropout 0.1 / 0.1 (dropout also on embeddings and pooled output),
      init_stddev 0.02 (also the embeddings'; None -> 0.02).
  """
  vocab_size: int = 30522
  max_len: int = 512
  type_vocab_size: int = 2
  num_layers: int = 12
  embed_dim: int = 768
  positions: str = "learned"
  scale_embeddings: bool | None = None
  mlm_head: bool = False
  nsp_head: bool = False
  num_classes: int = 0
  pooling: str = "cls"
  remat: bool = False
  scan_layers: bool = False
  block: BlockConfig = dataclasses.field(default_factory=lambda: BlockConfig(
      num_heads=12, mlp_dim=3072, activation="gelu_exact", norm="post", norm_eps=1e-12,
      dropout_rate=0.1, attention_dropout_rate=0.1, init_stddev=0.02))

  def __post_init__(self):
    common.check_common(self)
    common.check_positive(self, "vocab_size", "max_len")
    if self.pooling not in POOLINGS:
      raise ValueError(f"BERTConfig.pooling={self.pooling!r}: expected one of {POOLINGS}")
    for field in ("num_classes", "type_vocab_size", "num_layers"):
      value = getattr(self, field)
      if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"BERTConfig.{field}={value!r}: expected an int >= 0")
    if self.pooling == "max_of_logits" and (not self.num_classes or self.nsp_head):
      raise ValueError("BERTConfig.pooling='max_of_logits' pools the classifier's logits: "
                       f"it needs num_classes > 0 (got {self.num_classes}) and "
                       f"nsp_head=False (got {self.nsp_head})")

  @property
  def init_stddev(self) -> float:
    return 0.02 if self.block.init_stddev is None else self.block.init_stddev


def untrained_params(section: Mapping[str, Any]) -> tuple[str, ...]:
  """Top-level parameters a run with this model section never gave a gradient.

  The ``pooler`` (tanh(dense(h[CLS]))) is read only by the NSP head or a classifier on
  "cls" pooling; after MLM-only pre-training it is still its random init (and with
  other poolings there is none). A fine-tuning run that starts from such a run trains
  it as part of its head rather than loading it.
  """
  if section.get("pooling", "cls") != "cls":
    return ("pooler",)
  return () if section.get("nsp_head") or section.get("num_classes") else ("pooler",)


def masked_pool(x_BLD: Array, valid_BL: Array, kind: str) -> Array:
  """Mean or max of ``x [B, L, D]`` over positions where ``valid [B, L]`` is True.

  Rows without any valid position give zeros. Computed in float32.
  """
  valid_BL1 = valid_BL.astype(bool)[:, :, None]
  x_BLD = x_BLD.astype(jnp.float32)
  if kind == "mean":
    count_B1 = jnp.maximum(valid_BL1.sum(axis=1), 1).astype(jnp.float32)
    return jnp.where(valid_BL1, x_BLD, 0.0).sum(axis=1) / count_B1
  if kind == "max":
    pooled_BD = jnp.where(valid_BL1, x_BLD, -jnp.inf).max(axis=1)
    return jnp.where(valid_BL1.any(axis=1), pooled_BD, 0.0)
  raise ValueError(f"masked_pool: kind={kind!r}; expected 'mean' or 'max'")


class BERT(nn.Module):
  """Encoder with heads; returns a dict (see the module docstring).

  Params: ``token_embedding``, ``position_embedding``, ``token_type_embedding``,
  ``embedding_norm`` (post-LN), ``encoder``, ``pooler`` (pooling="cls"), ``mlm_transform``,
  ``mlm_norm``, ``mlm_bias``, ``nsp``, ``classifier``.
  """
  config: BERTConfig

  @nn.compact
  def __call__(self, input_ids_BL: Array, token_type_ids: Array | None = None,
               attention_mask: Array | None = None, positions: Array | None = None,
               mlm_positions: Array | None = None, deterministic: bool = True,
               padding_mask: Array | None = None) -> dict[str, Array]:
    """Args:
      input_ids_BL: int [batch, length].
      token_type_ids: int [batch, length] segment A/B ids (default zeros).
      attention_mask: [batch, length], non-zero/True = real token (default: all real).
      positions: int [batch, length] (default arange).
      mlm_positions: int [batch, P] positions to run the MLM head on (default: all).
      deterministic: False enables dropout (rngs={'dropout': key}).
      padding_mask: alias of attention_mask (pass one of them).
    Returns:
      dict with "sequence", "pooled" and the enabled heads' float32 logits.
    """
    cfg = self.config
    block = cfg.block
    common.check_tokens("input_ids", input_ids_BL, max_length=cfg.max_len)
    if attention_mask is not None and padding_mask is not None:
      raise ValueError("BERT: pass attention_mask or padding_mask, not both")
    valid_BL = attention_mask if attention_mask is not None else padding_mask
    if valid_BL is not None and valid_BL.shape != input_ids_BL.shape:
      raise ValueError(f"attention_mask shape {valid_BL.shape} != input_ids shape "
                       f"{input_ids_BL.shape}")
    if valid_BL is None:
      valid_BL = jnp.ones(input_ids_BL.shape, bool)
    valid_BL = valid_BL.astype(bool)
    if token_type_ids is None:
      token_type_ids = jnp.zeros_like(input_ids_BL)
    if positions is None:
      positions = embeddings.default_positions(input_ids_BL)
    init = nn.initializers.normal(cfg.init_stddev)
    kw = dict(dtype=block.dtype, param_dtype=block.param_dtype)
    drop = nn.Dropout(block.dropout_rate)

    embed = common.token_embedding(cfg, cfg.vocab_size, stddev=cfg.init_stddev,
                                   name="token_embedding", **kw)
    x_BLD = embed(input_ids_BL)
    x_BLD = common.add_positions(x_BLD, positions, cfg, cfg.max_len)
    if cfg.type_vocab_size:
      x_BLD = x_BLD + embeddings.TokenTypeEmbed(
          cfg.type_vocab_size, cfg.embed_dim, embedding_init=init,
          name="token_type_embedding", **kw)(token_type_ids)
    if block.norm == "post":
      x_BLD = block.make_norm("embedding_norm")(x_BLD)
    x_BLD = drop(x_BLD, deterministic=deterministic)
    x_BLD = common.constrain(x_BLD)

    mask_B11L = masks.make_key_mask(valid_BL)       # keys: real tokens only
    h_BLD = Stack(EncoderBlock, dataclasses.replace(block, init_stddev=cfg.init_stddev),
                  cfg.num_layers, remat=cfg.remat, scan=cfg.scan_layers,
                  block_kwargs={"rotary": cfg.positions == "rotary"}, name="encoder")(
                      x_BLD, mask_B11L, None, positions, deterministic=deterministic)
    out = {"sequence": h_BLD}

    if cfg.pooling == "cls":
      pooled_BD = jnp.tanh(dense(cfg.embed_dim, axes.EMBED, axes.MLP, use_bias=True,
                                 kernel_init=init, name="pooler", **kw)(h_BLD[:, 0]))
    else:
      kind = "max" if cfg.pooling == "max_of_logits" else cfg.pooling
      pooled_BD = masked_pool(h_BLD, valid_BL, kind).astype(block.dtype)
    out["pooled"] = pooled_BD

    if cfg.mlm_head:
      m_BPD = h_BLD
      if mlm_positions is not None:
        common.check_tokens("mlm_positions", mlm_positions)
        m_BPD = jnp.take_along_axis(h_BLD, mlm_positions[:, :, None], axis=1)
      m_BPD = dense(cfg.embed_dim, axes.EMBED, axes.MLP, use_bias=True, kernel_init=init,
                    name="mlm_transform", **kw)(m_BPD)
      m_BPD = ACTIVATIONS[block.activation][0](m_BPD)
      m_BPD = block.make_norm("mlm_norm")(m_BPD)
      bias_V = self.param("mlm_bias", nn.with_logical_partitioning(
          nn.initializers.zeros, (axes.VOCAB,)), (cfg.vocab_size,), block.param_dtype)
      out["mlm_logits"] = embed.attend(m_BPD) + bias_V.astype(jnp.float32)[None, None, :]
    pooled_BD = drop(pooled_BD, deterministic=deterministic)
    if cfg.nsp_head:
      out["nsp_logits"] = dense(2, axes.EMBED, None, use_bias=True, kernel_init=init,
                                name="nsp", **kw)(pooled_BD).astype(jnp.float32)
    if cfg.num_classes:
      classifier = dense(cfg.num_classes, axes.EMBED, axes.VOCAB, use_bias=True,
                         kernel_init=init, name="classifier", **kw)
      if cfg.pooling == "max_of_logits":    # max_t Linear(h_t), over real tokens
        h_BLD = drop(h_BLD, deterministic=deterministic)
        out["logits"] = masked_pool(classifier(h_BLD), valid_BL, "max")
      else:
        out["logits"] = classifier(pooled_BD).astype(jnp.float32)
    return out


# --- presets ----------------------------------------------------------------------------

def bert_base(**overrides: Any) -> BERTConfig:
  """BERT-base (110M): 12 x 768, 12 heads, vocab 30522, 512 positions, 2 token types."""
  return common.replace(BERTConfig(), **overrides)


def bert_large(**overrides: Any) -> BERTConfig:
  """BERT-large (340M): 24 x 1024, 16 heads."""
  sizes = dict(num_layers=24, embed_dim=1024, num_heads=16, mlp_dim=4096)
  return common.replace(BERTConfig(), **{**sizes, **overrides})


def bert_tiny(**overrides: Any) -> BERTConfig:
  """Test-sized: 2 layers x 32 wide, 2 heads, 16 positions, vocab 64, no dropout."""
  cfg = common.replace(BERTConfig(), vocab_size=64, max_len=16, num_layers=2,
                       embed_dim=32, num_heads=2, mlp_dim=64, dropout_rate=0.0,
                       attention_dropout_rate=0.0)
  return common.replace(cfg, **overrides)


def nyu_imdb_classifier(**overrides: Any) -> BERTConfig:
  """The IMDB sentiment classifier of the NYU deep-learning notes, as written there.

  One encoder layer, d_model 32, 2 heads, feed-forward 128 (ReLU), sinusoidal
  positions, a vocabulary of 50,002, no bias on W_q/W_k/W_v and a bias on W_h,
  post-LN, and the output ``max over time of Linear(h_t)`` to 2 classes
  (``pooling="max_of_logits"``); no token types. Where the notes say nothing we keep
  BERT's choices: a LN on the embeddings (eps 1e-6 throughout), dropout 0.1, 512
  positions, normal(0.02) init of the other weights.

  Two deliberate departures from the notes:

  * The max over time is *masked*: it runs over the real tokens only (``masked_pool``),
    while the notes take it over all positions, padding included. With padding in the
    max, a review's logits depend on how much padding its batch gave it; the masked max
    does not, and is what we keep.
  * The token embeddings follow the Transformer's convention for sinusoidal positions
    (``scale_embeddings``, on by default with sinusoids): table at stddev
    ``32**-0.5``, looked up times ``sqrt(32)``, so tokens start at unit scale like the
    sinusoids added to them. Unscaled (``scale_embeddings=False``), the unit-amplitude
    sinusoids would swamp tokens drawn at stddev 0.02.
  """
  cfg = common.replace(
      BERTConfig(), vocab_size=50_002, max_len=512, type_vocab_size=0, num_layers=1,
      embed_dim=32, positions="sinusoidal", num_classes=2, pooling="max_of_logits",
      num_heads=2, mlp_dim=128, activation="relu", norm="post", norm_eps=1e-6,
      qkv_bias=False, out_bias=True, attention_dropout_rate=0.0)
  return common.replace(cfg, **overrides)
