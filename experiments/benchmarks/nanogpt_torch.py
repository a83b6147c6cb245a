"""nanoGPT's model and trainer in PyTorch, for the CPU comparison with our GPT.

The model is Karpathy's nanoGPT ``model.py`` (fused ``c_attn``, pre-LN blocks, learned
positions, tied embeddings), its schedule and AdamW setup are ``train.py``'s; the
harness that runs both sides on the same batches is
:mod:`experiments.benchmarks.nanogpt_cpu`. torch is optional (not a project
dependency): without it only the configuration helpers here work.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

try:
  import torch
except ImportError:  # torch is optional: only the PyTorch side needs it.
  torch = None

TORCH_ATTENTION = ("causal", "segments")
Batch = Mapping[str, np.ndarray]
_TorchModule = torch.nn.Module if torch is not None else object


def torch_available() -> bool:
  """Whether the PyTorch side can run."""
  return torch is not None


def _require_torch() -> None:
  if torch is None:
    raise ImportError("the PyTorch side needs torch: pip install torch (CPU wheel)")


@dataclasses.dataclass(frozen=True)
class NanoGPTConfig:
  """nanoGPT's ``GPTConfig`` (``model.py``), plus the GELU flavour.

  Attributes:
    vocab_size / block_size / n_layer / n_head / n_embd / bias: as in nanoGPT.
    gelu: "none" = exact erf GELU (nanoGPT's ``nn.GELU()``); "tanh" = the tanh
      approximation (GPT-2's, and ours), for checking equivalence with our GPT.
  """
  vocab_size: int = 263
  block_size: int = 64
  n_layer: int = 4
  n_head: int = 4
  n_embd: int = 128
  bias: bool = True
  gelu: str = "none"

  def __post_init__(self):
    if self.n_embd % self.n_head:
      raise ValueError(f"NanoGPTConfig.n_embd={self.n_embd} is not divisible by "
                       f"n_head={self.n_head}")
    if self.gelu not in ("none", "tanh"):
      raise ValueError(f"NanoGPTConfig.gelu={self.gelu!r} must be 'none' or 'tanh'")

  @classmethod
  def from_model_section(cls, model: Mapping[str, Any], **overrides: Any
                         ) -> NanoGPTConfig:
    """The nanoGPT equivalent of a ``config.model`` section of ours.

    Raises a ValueError naming the field if ours is something nanoGPT cannot express
    (its MLP is always 4x wide, positions learned, norms pre-LN, no dropout here).
    """
    block = model["block"]
    expected = {"name": "gpt", "positions": "learned",
                "block.mlp_dim": 4 * model["embed_dim"], "block.dropout_rate": 0.0,
                "block.attention_dropout_rate": 0.0}
    for key, want in expected.items():
      got = block.get(key[6:], want) if key.startswith("block.") else model.get(key,
                                                                                want)
      if got != want:
        raise ValueError(f"model.{key}={got!r}: the nanoGPT comparison needs {want!r}")
    for key in ("norm", "num_kv_heads", "head_dim"):
      if block.get(key) not in (None, "pre"):
        raise ValueError(f"model.block.{key}={block.get(key)!r} has no nanoGPT "
                         "equivalent")
    fields = dict(vocab_size=model["vocab_size"], block_size=model["max_len"],
                  n_layer=model["num_layers"], n_head=block["num_heads"],
                  n_embd=model["embed_dim"], bias=block.get("use_bias", True))
    fields.update(overrides)
    return cls(**fields)


@dataclasses.dataclass(frozen=True)
class TrainSettings:
  """nanoGPT ``train.py`` settings for the PyTorch trainer.

  Attributes:
    steps: optimizer steps (nanoGPT's ``max_iters``; also ``lr_decay_iters``).
    learning_rate / min_lr / warmup_steps: nanoGPT's ``get_lr`` schedule.
    b1 / b2 / eps / weight_decay: AdamW (decay on >= 2-D parameters only).
    grad_clip: global-norm clip (0 = none).
    log_every: window length for the step-time statistics (and log lines).
    eval_every: evaluate after every ``eval_every`` steps and after the last.
    threads: ``torch.set_num_threads``.
    attention: "causal" (nanoGPT) or "segments" (positions + segment mask).
    seed: ``torch.manual_seed`` (nanoGPT: 1337).
  """
  steps: int = 2000
  learning_rate: float = 1e-3
  min_lr: float = 1e-4
  warmup_steps: int = 100
  b1: float = 0.9
  b2: float = 0.99
  eps: float = 1e-8
  weight_decay: float = 0.1
  grad_clip: float = 1.0
  log_every: int = 10
  eval_every: int = 250
  threads: int = 2
  attention: str = "causal"
  seed: int = 1337

  def __post_init__(self):
    for name in ("steps", "log_every", "eval_every", "threads"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"TrainSettings.{name}={value!r} must be an int >= 1")
    if self.attention not in TORCH_ATTENTION:
      raise ValueError(f"TrainSettings.attention={self.attention!r} is not one of "
                       f"{TORCH_ATTENTION}")

  @classmethod
  def from_config(cls, config: Any, **overrides: Any) -> TrainSettings:
    """From our config's ``optimizer``/``train`` sections (same numbers as ours)."""
    opt, train = config["optimizer"], config["train"]
    if opt.get("schedule", "cosine") != "cosine":
      raise ValueError(f"optimizer.schedule={opt['schedule']!r}: nanoGPT's schedule is "
                       "cosine")
    if opt.get("grad_accum_steps", 1) != 1:
      raise ValueError(f"optimizer.grad_accum_steps={opt['grad_accum_steps']!r}: the "
                       "comparison needs 1")
    fields = dict(
        steps=train["num_steps"], learning_rate=opt["learning_rate"],
        min_lr=opt["learning_rate"] * opt["end_lr_fraction"],
        warmup_steps=opt["warmup_steps"], b1=opt["b1"], b2=opt["b2"], eps=opt["eps"],
        weight_decay=opt["weight_decay"], grad_clip=opt["grad_clip_norm"] or 0.0,
        eval_every=train["eval_every"])
    fields.update(overrides)
    return cls(**fields)


def nanogpt_lr(it: int, *, learning_rate: float, min_lr: float, warmup_steps: int,
               decay_steps: int) -> float:
  """nanoGPT's ``get_lr(it)`` (0-based iteration): linear warmup, cosine to min_lr."""
  if it < warmup_steps:
    return learning_rate * (it + 1) / (warmup_steps + 1)
  if it > decay_steps:
    return min_lr
  ratio = (it - warmup_steps) / max(decay_steps - warmup_steps, 1)
  coeff = 0.5 * (1.0 + math.cos(math.pi * ratio))
  return min_lr + coeff * (learning_rate - min_lr)


# --- nanoGPT's model (PyTorch) --------------------------------------------------------


class CausalSelfAttention(_TorchModule):
  """nanoGPT's attention: fused c_attn, SDPA, c_proj."""

  def __init__(self, cfg: NanoGPTConfig):
    super().__init__()
    self.n_head, self.n_embd = cfg.n_head, cfg.n_embd
    self.c_attn = torch.nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)
    self.c_proj = torch.nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)

  def forward(self, x_BLD, attn_mask=None):
    """x: [batch, length, n_embd]; attn_mask: None (causal) or bool [B, 1, L, L]."""
    b, l, d = x_BLD.shape
    q, k, v = self.c_attn(x_BLD).split(self.n_embd, dim=2)
    q_BHLK, k_BHLK, v_BHLK = (
        t.view(b, l, self.n_head, d // self.n_head).transpose(1, 2) for t in (q, k, v))
    if attn_mask is None:
      y_BHLK = torch.nn.functional.scaled_dot_product_attention(
          q_BHLK, k_BHLK, v_BHLK, attn_mask=None, dropout_p=0.0, is_causal=True)
    else:
      y_BHLK = torch.nn.functional.scaled_dot_product_attention(
          q_BHLK, k_BHLK, v_BHLK, attn_mask=attn_mask, dropout_p=0.0)
    return self.c_proj(y_BHLK.transpose(1, 2).contiguous().view(b, l, d))


class MLP(_TorchModule):
  """nanoGPT's MLP: c_fc (4x), GELU, c_proj."""

  def __init__(self, cfg: NanoGPTConfig):
    super().__init__()
    self.c_fc = torch.nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
    self.gelu = torch.nn.GELU(approximate=cfg.gelu)
    self.c_proj = torch.nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)

  def forward(self, x_BLD):
    return self.c_proj(self.gelu(self.c_fc(x_BLD)))


class Block(_TorchModule):
  """Pre-LN block: ``x + attn(ln_1(x))``, then ``x + mlp(ln_2(x))``."""

  def __init__(self, cfg: NanoGPTConfig):
    super().__init__()
    self.ln_1 = torch.nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
    self.attn = CausalSelfAttention(cfg)
    self.ln_2 = torch.nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
    self.mlp = MLP(cfg)

  def forward(self, x_BLD, attn_mask=None):
    x_BLD = x_BLD + self.attn(self.ln_1(x_BLD), attn_mask)
    return x_BLD + self.mlp(self.ln_2(x_BLD))


class NanoGPT(_TorchModule):
  """nanoGPT's ``GPT``: tokens ``[B, L]`` -> logits ``[B, L, V]`` (float32)."""

  def __init__(self, cfg: NanoGPTConfig):
    _require_torch()
    super().__init__()
    self.config = cfg
    self.transformer = torch.nn.ModuleDict(dict(
        wte=torch.nn.Embedding(cfg.vocab_size, cfg.n_embd),
        wpe=torch.nn.Embedding(cfg.block_size, cfg.n_embd),
        h=torch.nn.ModuleList([Block(cfg) for _ in range(cfg.n_layer)]),
        ln_f=torch.nn.LayerNorm(cfg.n_embd, bias=cfg.bias)))
    self.lm_head = torch.nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
    self.transformer.wte.weight = self.lm_head.weight  # weight tying
    self.apply(self._init_weights)
    for name, p in self.named_parameters():
      if name.endswith("c_proj.weight"):
        torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

  @staticmethod
  def _init_weights(module) -> None:
    if isinstance(module, torch.nn.Linear):
      torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
      if module.bias is not None:
        torch.nn.init.zeros_(module.bias)
    elif isinstance(module, torch.nn.Embedding):
      torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

  def num_params(self) -> int:
    """All parameters (the tied embedding once, the position table included)."""
    return sum(p.numel() for p in self.parameters())

  def forward(self, idx_BL, positions_BL=None, attn_mask=None):
    """idx: int64 [B, L]; positions: None (arange) or [B, L]; attn_mask: see Block."""
    if positions_BL is None:
      positions_BL = torch.arange(idx_BL.shape[1], dtype=torch.long)[None, :]
    x_BLD = self.transformer.wte(idx_BL) + self.transformer.wpe(positions_BL)
    for block in self.transformer.h:
      x_BLD = block(x_BLD, attn_mask)
    return self.lm_head(self.transformer.ln_f(x_BLD))

  def configure_optimizer(self, settings: TrainSettings):
    """nanoGPT's ``configure_optimizers``: decay >= 2-D params, not biases / norms."""
    params = [p for p in self.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2],
               "weight_decay": settings.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=settings.learning_rate,
                             betas=(settings.b1, settings.b2), eps=settings.eps)


def load_jax_params(model: NanoGPT, params: Mapping[str, Any]) -> None:
  """Copies our GPT's Flax ``params`` into ``model`` (for equivalence checks).

  Our layout: ``token_embedding/embedding [V, D]``, ``position_embedding/embedding``,
  ``decoder/layers_i/{attention_norm, self_attention/{qkv [D, 3, H, K], out [H, K,
  D]}, mlp_norm, mlp/{wi, wo}}``, ``decoder/final_norm``.
  """
  _require_torch()

  def arr(x):  # unboxes nn.LogicallyPartitioned leaves
    return np.asarray(x.unbox() if hasattr(x, "unbox") else x, np.float32)

  def t(x):
    return torch.from_numpy(np.array(arr(x), copy=True))

  def norm(dst, src):
    dst.weight.data.copy_(t(src["scale"]))
    if dst.bias is not None:
      dst.bias.data.copy_(t(src["bias"]))

  def linear(dst, kernel, bias):
    # Flax kernels are [in, ...out] (qkv: [D, 3, H, K], out: [H, K, D]); torch's
    # weight is [out, in], with the same flattening order (q|k|v, then heads).
    kernel_io = arr(kernel).reshape(dst.in_features, dst.out_features)
    dst.weight.data.copy_(t(kernel_io.T))
    if dst.bias is not None:
      dst.bias.data.copy_(t(arr(bias).reshape(-1)))

  tr = model.transformer
  vocab = tr.wte.weight.shape[0]  # our table may be padded (vocab_pad_multiple)
  tr.wte.weight.data.copy_(t(arr(params["token_embedding"]["embedding"])[:vocab]))
  tr.wpe.weight.data.copy_(t(params["position_embedding"]["embedding"]))
  dec = params["decoder"]
  for i, block in enumerate(tr.h):
    p = dec[f"layers_{i}"]
    norm(block.ln_1, p["attention_norm"])
    norm(block.ln_2, p["mlp_norm"])
    attn = p["self_attention"]
    linear(block.attn.c_attn, attn["qkv"]["kernel"], attn["qkv"].get("bias"))
    linear(block.attn.c_proj, attn["out"]["kernel"], attn["out"].get("bias"))
    linear(block.mlp.c_fc, p["mlp"]["wi"]["kernel"], p["mlp"]["wi"].get("bias"))
    linear(block.mlp.c_proj, p["mlp"]["wo"]["kernel"], p["mlp"]["wo"].get("bias"))
  norm(tr.ln_f, dec["final_norm"])


def segment_attention_mask(segment_ids_BL):
  """bool ``[B, 1, L, L]``: causal and same segment (our GPT's packed attention)."""
  l = segment_ids_BL.shape[1]
  causal_LL = torch.ones(l, l, dtype=torch.bool).tril()
  same_BLL = segment_ids_BL[:, :, None] == segment_ids_BL[:, None, :]
  return (same_BLL & causal_LL[None])[:, None]


def to_torch_batch(batch: Batch, attention: str) -> dict[str, Any]:
  """numpy LM batch -> torch tensors the model and loss take."""
  out = {"inputs": torch.from_numpy(np.asarray(batch["inputs"], np.int64)),
         "targets": torch.from_numpy(np.asarray(batch["targets"], np.int64)),
         "weights": torch.from_numpy(np.array(batch["weights"], np.float32)),
         "positions": None, "attn_mask": None}
  if attention == "segments":
    out["positions"] = torch.from_numpy(np.asarray(batch["positions"], np.int64))
    out["attn_mask"] = segment_attention_mask(
        torch.from_numpy(np.asarray(batch["segment_ids"], np.int64)))
  return out


def weighted_loss_sums(logits_BLV, targets_BL, weights_BL):
  """``(sum(w * ce), sum(w))``: numerator and denominator of our causal-LM loss."""
  ce_BL = torch.nn.functional.cross_entropy(
      logits_BLV.reshape(-1, logits_BLV.shape[-1]), targets_BL.reshape(-1),
      reduction="none").view_as(weights_BL)
  return (ce_BL * weights_BL).sum(), weights_BL.sum()


def weighted_loss(logits_BLV, targets_BL, weights_BL):
  """``sum(w * ce) / sum(w)`` (0 when no weight), as ``causal_lm.loss``."""
  total, count = weighted_loss_sums(logits_BLV, targets_BL, weights_BL)
  return total / count.clamp_min(1e-9)  # no weight -> total is 0 -> 0


def evaluate_torch(model: NanoGPT, batches: Sequence[Batch], attention: str) -> float:
  """Token-weighted mean loss over ``batches`` (as our ``Evaluator``)."""
  model.eval()
  total, count = 0.0, 0.0
  with torch.no_grad():
    for batch in batches:
      tb = to_torch_batch(batch, attention)
      logits = model(tb["inputs"], tb["positions"], tb["attn_mask"])
      s, n = weighted_loss_sums(logits, tb["targets"], tb["weights"])
      total += float(s)
      count += float(n)
  model.train()
  return total / max(count, 1e-9)


def train_torch(model_cfg: NanoGPTConfig, settings: TrainSettings,
                train_batches: Iterator[Batch], eval_batches: Sequence[Batch], *,
                log: Callable[[str], None] | None = print) -> dict[str, Any]:
  """nanoGPT's training loop on the given batches.

  Args:
    model_cfg: the model.
    settings: optimizer, schedule, eval and threading settings.
    train_batches: yields numpy LM batches (``inputs``/``targets``/``weights`` and,
      for ``attention="segments"``, ``segment_ids``/``positions``), one per step.
    eval_batches: the held-out batches, evaluated after every ``eval_every`` steps and
      after the last step.
    log: where progress lines go (None: silent).
  Returns:
    ``{"num_params", "step_ms": [per step], "losses": [per step], "evals": [{"step",
    "eval_loss"}], "wall_time_s"}``. Step times cover fetching the batch, forward,
    backward, clipping and the update; evaluation is outside them.
  """
  _require_torch()
  torch.set_num_threads(settings.threads)
  torch.manual_seed(settings.seed)
  model = NanoGPT(model_cfg)
  model.train()
  optimizer = model.configure_optimizer(settings)
  step_ms, losses, evals = [], [], []
  t_begin = time.perf_counter()
  for it in range(settings.steps):
    t0 = time.perf_counter()
    tb = to_torch_batch(next(train_batches), settings.attention)
    lr = nanogpt_lr(it, learning_rate=settings.learning_rate, min_lr=settings.min_lr,
                    warmup_steps=settings.warmup_steps, decay_steps=settings.steps)
    for group in optimizer.param_groups:
      group["lr"] = lr
    logits = model(tb["inputs"], tb["positions"], tb["attn_mask"])
    loss = weighted_loss(logits, tb["targets"], tb["weights"])
    loss.backward()
    if settings.grad_clip:
      torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    loss_value = loss.item()
    step_ms.append(1000.0 * (time.perf_counter() - t0))
    losses.append(loss_value)
    step = it + 1
    if log is not None and (step % settings.log_every == 0 or step == settings.steps):
      window = step_ms[-settings.log_every:]
      log(f"[torch] step {step}/{settings.steps} | loss {loss_value:.4f} | "
          f"{statistics.fmean(window):.1f} ms/step | lr {lr:.2e}")
    if step % settings.eval_every == 0 or step == settings.steps:
      eval_loss = evaluate_torch(model, eval_batches, settings.attention)
      evals.append({"step": step, "eval_loss": eval_loss})
      if log is not None:
        log(f"[torch] eval @ step {step}: eval_loss {evals[-1]['eval_loss']:.4f}")
  return {"num_params": model.num_params(), "step_ms": step_ms, "losses": losses,
          "evals": evals, "wall_time_s": time.perf_counter() - t_begin}
