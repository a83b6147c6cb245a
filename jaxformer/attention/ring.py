"""Context parallelism: attention over sequences sharded along a ``context`` mesh axis.

Two ways (``context_parallel="ring" | "all_gather"``), both written with ``shard_map``:

* ``"ring"`` (Liu et al., 2023): each device keeps its query block and passes its K/V
  block (and the key segment ids) around the ring with ``lax.ppermute``; at every step
  the block kernel returns ``(out, lse)`` for the visiting block and the running output
  is merged by log-sum-exp. The next ``ppermute`` is issued before the block kernel so
  that XLA can overlap the transfer with the compute. The backward (a custom VJP)
  re-circulates K/V together with the dK/dV accumulators, which return to their owner
  after one last hop. No device ever holds a full-length tensor: memory per device is
  O(L / N).
* ``"all_gather"`` (MaxText's simpler context parallelism): K/V are all-gathered over
  the context axis (O(L) per device), queries stay local; the same block schedule then
  runs without communication, and autodiff turns the gather into a reduce-scatter of
  dK/dV. Fewer, larger messages: the better choice for short rings.

The block kernel is the Pallas kernel on GPU/TPU and ``chunked.py`` elsewhere (both
return the lse the merge needs; ``block_impl`` forces one); local blocks of at most
512 x 512 scores off GPU/TPU use one einsum (the chunked kernel would hold a block that
size anyway, and the einsum compiles several times faster).

Causal attention is load balanced with the "zigzag" layout: the sequence is cut into
``2N`` chunks and device ``i`` holds chunks ``i`` and ``2N-1-i`` (converted from and to
the contiguous layout of the sharded arrays with two ``ppermute`` of half blocks each
way). Then at every ring step every device does the same work: its own block is
causal; a block from an earlier device is seen whole by all local queries against its
first half; a block from a later device is seen whole by the second half of the local
queries. (Naive contiguous causal rings leave device 0 idle most of the time.)

Semantics are those of ``dot_product_attention``: packed segment ids, GQA, bottom-right
causal for ``Lq != Lk`` (by padding the shorter side at the front to equal lengths:
padded queries are dropped, padded keys masked), a key padding mask ``[B, Lk]``, and
lengths that ``2N`` (causal) or ``N`` does not divide (padded at the end; padded keys
masked through the segment ids, padded queries dropped). Key validity is folded into
the segment ids: ``q_id' = 2 q_id`` and ``kv_id' = 2 kv_id + (not valid)`` are equal iff
the ids are equal and the key is valid.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import logging
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

from jaxformer.attention import chunked as chunked_lib

Array = jax.Array

logger = logging.getLogger(__name__)

CONTEXT_AXIS = "context"
MODES = ("ring", "all_gather")
BLOCK_IMPLEMENTATIONS = ("einsum", "chunked", "pallas")
# Off GPU/TPU, local blocks up to this many scores use one einsum: the chunked kernel
# would hold a block of the same size (its 512 x 512 default), and compiles slower.
EINSUM_MAX_SCORES = 512 * 512

_NEG = -1e30     # lse of a row that has seen no key yet (finite: no inf - inf)
_EMPTY = 1e30    # lse of a row with no allowed key, for the backward: exp(s - lse) = 0

_MODE = contextvars.ContextVar("jaxformer_context_parallel", default="ring")


@contextlib.contextmanager
def context_parallel(mode: str):
  """Sets how ``dot_product_attention`` computes attention over a sharded length axis.

  The training step enters this with ``attention.context_parallel`` next to the mesh
  and rules; ``dot_product_attention(context_parallel=...)`` overrides it per call.
  """
  check_mode(mode)
  token = _MODE.set(mode)
  try:
    yield
  finally:
    _MODE.reset(token)


def check_mode(mode: Any) -> str:
  if mode not in MODES:
    raise ValueError(f"context_parallel={mode!r}; valid: {MODES}")
  return mode


def current_mode() -> str:
  return _MODE.get()


def shard_map(f, *, mesh, in_specs, out_specs):
  """``jax.shard_map`` (jax >= 0.6; jax 0.10 and 0.11 have it) or the experimental one."""
  if hasattr(jax, "shard_map"):
    return jax.shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs,
                         check_vma=False)
  from jax.experimental.shard_map import shard_map as legacy  # pylint: disable=g-import-not-at-top
  return legacy(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_rep=False)


# --------------------------------------------------------------------------------------
# Which mesh and specs apply (read from the active mesh and logical-axis rules).
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Layout:
  """Where the operands live: the mesh and the mesh axes of batch, length and heads."""
  mesh: Any
  batch_axes: tuple[str, ...]
  heads_axes: tuple[str, ...]
  kv_heads_axes: tuple[str, ...]
  axis: str = CONTEXT_AXIS

  @property
  def size(self) -> int:
    return int(self.mesh.shape[self.axis])


def _axes_tuple(entry) -> tuple[str, ...]:
  if entry is None:
    return ()
  return (entry,) if isinstance(entry, str) else tuple(entry)


def active_layout(query: Array, key: Array) -> Layout | None:
  """The layout when the active mesh and rules shard ``ACT_LENGTH`` over a ``context``
  axis of size N > 1 and both lengths are at least N, else None. Mesh axes that do not
  divide the batch or head dimension are left out of their specs (replicated)."""
  from jaxformer import axes  # pylint: disable=g-import-not-at-top
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or CONTEXT_AXIS not in tuple(getattr(mesh, "axis_names", ()) or ()):
    return None
  if mesh.shape[CONTEXT_AXIS] <= 1:
    return None
  if min(query.shape[1], key.shape[1]) < mesh.shape[CONTEXT_AXIS]:
    # Too short to split (a decoding step): the partitioner gathers the few positions.
    return None
  rules = dict(nn.get_logical_axis_rules())
  if CONTEXT_AXIS not in _axes_tuple(rules.get(axes.ACT_LENGTH)):
    return None

  def fitting(name, size):
    kept = tuple(a for a in _axes_tuple(rules.get(name))
                 if a in mesh.axis_names and a != CONTEXT_AXIS)
    total = 1
    for a in kept:
      total *= mesh.shape[a]
    return kept if size % total == 0 else ()

  return Layout(mesh=mesh, batch_axes=fitting(axes.ACT_BATCH, query.shape[0]),
                heads_axes=fitting(axes.ACT_HEADS, query.shape[2]),
                kv_heads_axes=fitting(axes.ACT_KV_HEADS, key.shape[2]))


def unsupported(*, has_bias: bool, hard: bool, return_weights: bool, dropout: bool,
                mask: Array | None) -> str | None:
  """Why context-parallel attention cannot compute this call, or None."""
  extras = [name for name, on in (("bias", has_bias), ("hard", hard),
                                  ("return_weights", return_weights),
                                  ("dropout", dropout)) if on]
  if mask is not None and not is_key_mask(mask):
    extras.append("a mask that is not a key padding mask [B|1, 1, 1, Lk]")
  return f"it does not support {', '.join(extras)}" if extras else None


def is_key_mask(mask: Array) -> bool:
  return mask.ndim == 4 and mask.shape[1] == 1 and mask.shape[2] == 1


# --------------------------------------------------------------------------------------
# The entry point (global view).
# --------------------------------------------------------------------------------------


def context_parallel_attention(query: Array, key: Array, value: Array, *, layout: Layout,
                               is_causal: bool = False,
                               q_segment_ids: Array | None = None,
                               kv_segment_ids: Array | None = None,
                               key_mask: Array | None = None, scale: float | None = None,
                               precision: Any = None, mode: str | None = None,
                               block_impl: str | None = None) -> Array:
  """Attention with the length axes sharded over ``layout.axis``.

  Args:
    query: ``[B, Lq, H, Dqk]``; key ``[B, Lk, Hkv, Dqk]``; value ``[B, Lk, Hkv, Dv]``.
    layout: the mesh and axes (``active_layout``).
    is_causal: bottom-right aligned causal mask (load balanced, module doc).
    q_segment_ids, kv_segment_ids: int ``[B, Lq]`` / ``[B, Lk]``, or both None.
    key_mask: bool, broadcastable to ``[B, 1, 1, Lk]`` (True = key may be attended).
    scale: logit multiplier, default ``1 / sqrt(Dqk)``.
    precision: of the block kernel's matmuls.
    mode: ``"ring"`` or ``"all_gather"``; None = ``current_mode()``.
    block_impl: ``"einsum"``, ``"chunked"`` or ``"pallas"``; None = Pallas on GPU/TPU,
      else chunked (einsum for small local blocks).
  Returns:
    ``[B, Lq, H, Dv]`` in the query dtype; rows with no allowed key are zeros.
  """
  mode = check_mode(current_mode() if mode is None else mode)
  if block_impl is None:
    block_impl = _default_block_impl(query, key, value, layout.size)
  if block_impl not in BLOCK_IMPLEMENTATIONS:
    raise ValueError(f"block_impl={block_impl!r}; valid: {BLOCK_IMPLEMENTATIONS}")
  if (q_segment_ids is None) != (kv_segment_ids is None):
    raise ValueError("context_parallel_attention: pass both q_segment_ids and "
                     "kv_segment_ids, or neither")
  batch, q_len, _, _ = query.shape
  kv_len = key.shape[1]
  n = layout.size
  scale = float(query.shape[-1] ** -0.5 if scale is None else scale)

  valid = None
  if key_mask is not None:
    valid = jnp.broadcast_to(jnp.asarray(key_mask, bool).reshape(
        key_mask.shape[0], key_mask.shape[-1]), (batch, kv_len))
  qs, ks = q_segment_ids, kv_segment_ids
  front_q = front_k = 0
  if is_causal and q_len != kv_len:
    # Bottom-right alignment == equal lengths after padding the shorter side in front.
    front_q, front_k = max(kv_len - q_len, 0), max(q_len - kv_len, 0)
    if front_k:
      valid = _pad_len(jnp.ones((batch, kv_len), bool) if valid is None else valid,
                       front_k, 0, False)
  length_q, length_k = q_len + front_q, kv_len + front_k
  unit = 2 * n if is_causal else n
  end_q, end_k = -length_q % unit, -length_k % unit
  if end_k and not is_causal:  # causal: keys past the end are never seen by real queries
    valid = _pad_len(jnp.ones((batch, kv_len + front_k), bool) if valid is None
                     else valid, 0, end_k, False)

  if valid is not None or qs is not None:
    qs = jnp.zeros((batch, q_len), jnp.int32) if qs is None else qs.astype(jnp.int32)
    ks = jnp.zeros((batch, kv_len), jnp.int32) if ks is None else ks.astype(jnp.int32)
    qs = _pad_len(2 * qs, front_q, end_q, -1)
    ks = _pad_len(ks, front_k, end_k, 0)
    ks = 2 * ks + (0 if valid is None else jnp.logical_not(valid).astype(jnp.int32))
  q = _pad_len(query, front_q, end_q, 0)
  k = _pad_len(key, front_k, end_k, 0)
  v = _pad_len(value, front_k, end_k, 0)

  cfg = _Ring(axis=layout.axis, size=n, causal=bool(is_causal), scale=scale,
              precision=precision, impl=block_impl, mode=mode)
  b_ax = layout.batch_axes or None
  spec_q = P(b_ax, layout.axis, layout.heads_axes or None, None)
  spec_kv = P(b_ax, layout.axis, layout.kv_heads_axes or None, None)
  spec_ids = P(b_ax, layout.axis)
  has_ids = qs is not None

  def local(q, k, v, qs, ks):
    if cfg.causal:
      q, k, v = (_to_zigzag(x, cfg) for x in (q, k, v))
      if has_ids:
        qs, ks = _to_zigzag(qs, cfg), _to_zigzag(ks, cfg)
    if cfg.mode == "ring":
      out = _ring(cfg, q, k, v, qs, ks)
    else:
      gather = functools.partial(lax.all_gather, axis_name=cfg.axis, axis=1, tiled=True)
      out = _gathered(cfg, q, gather(k), gather(v), qs, None if ks is None else gather(ks))
    return _from_zigzag(out, cfg) if cfg.causal else out

  ids_specs = (spec_ids, spec_ids) if has_ids else (None, None)
  fn = shard_map(local, mesh=layout.mesh,
                 in_specs=(spec_q, spec_kv, spec_kv) + ids_specs, out_specs=spec_q)
  out = fn(q, k, v, qs, ks)
  return out[:, front_q:front_q + q_len]


def _default_block_impl(query, key, value, n: int) -> str:
  """The Pallas kernel on GPU/TPU where it handles these inputs, else chunked (einsum
  for local blocks of at most ``EINSUM_MAX_SCORES`` scores)."""
  if jax.default_backend() not in ("gpu", "cuda", "rocm", "tpu"):
    local = -(-query.shape[1] // n) * -(-key.shape[1] // n)
    return "einsum" if local <= EINSUM_MAX_SCORES else "chunked"
  try:
    from kernels.flash_attention import supports  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    logger.info("context_parallel_attention: chunked blocks (no Pallas kernel: %s)", e)
    return "chunked"
  reason = supports(query, key, value)
  if reason is not None:
    logger.info("context_parallel_attention: chunked blocks (not Pallas: %s)", reason)
    return "chunked"
  return "pallas"


def _pad_len(x: Array, front: int, end: int, value) -> Array:
  if front == 0 and end == 0:
    return x
  widths = [(0, 0)] * x.ndim
  widths[1] = (front, end)
  return jnp.pad(x, widths, constant_values=value)


# --------------------------------------------------------------------------------------
# Zigzag layout: device i holds chunks (2i, 2i+1) of 2N <-> chunks (i, 2N-1-i).
# --------------------------------------------------------------------------------------


def _zigzag_perms(n: int):
  dest = lambda c: c if c < n else 2 * n - 1 - c  # noqa: E731  (device of chunk c)
  even = [(i, dest(2 * i)) for i in range(n)]
  odd = [(i, dest(2 * i + 1)) for i in range(n)]
  return even, odd


def _to_zigzag(x: Array, cfg: _Ring) -> Array:
  # Every device receives one even and one odd chunk: the even one is chunk d (first)
  # on an even device d and chunk 2N-1-d (second) on an odd one.
  half = x.shape[1] // 2
  even, odd = _zigzag_perms(cfg.size)
  got_even = lax.ppermute(x[:, :half], cfg.axis, even)
  got_odd = lax.ppermute(x[:, half:], cfg.axis, odd)
  is_even = lax.axis_index(cfg.axis) % 2 == 0
  first = jnp.where(is_even, got_even, got_odd)
  second = jnp.where(is_even, got_odd, got_even)
  return jnp.concatenate([first, second], axis=1)


def _from_zigzag(x: Array, cfg: _Ring) -> Array:
  half = x.shape[1] // 2
  even, odd = _zigzag_perms(cfg.size)
  is_even = lax.axis_index(cfg.axis) % 2 == 0
  first, second = x[:, :half], x[:, half:]
  even_chunk = jnp.where(is_even, first, second)
  odd_chunk = jnp.where(is_even, second, first)
  back = lambda perm: [(d, s) for s, d in perm]  # noqa: E731
  return jnp.concatenate([lax.ppermute(even_chunk, cfg.axis, back(even)),
                          lax.ppermute(odd_chunk, cfg.axis, back(odd))], axis=1)


# --------------------------------------------------------------------------------------
# Block kernels and the per-step schedule (local view, inside shard_map).
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Ring:
  axis: str
  size: int
  causal: bool
  scale: float
  precision: Any
  impl: str
  mode: str


def _einsum_scores(cfg: _Ring, q, k, qs, ks, causal: bool):
  """Scaled logits ``[B, Hkv, G, Q, S]`` float32 and the allowed mask (or None)."""
  b, lq, h, d = q.shape
  lk, hkv = k.shape[1], k.shape[2]
  q5 = q.reshape(b, lq, hkv, h // hkv, d)
  s = jnp.einsum("bqhgd,bshd->bhgqs", q5, k, preferred_element_type=jnp.float32,
                 precision=cfg.precision) * cfg.scale
  allowed = None
  if causal:
    allowed = (jnp.arange(lq)[:, None] + (lk - lq) >= jnp.arange(lk)[None, :])[
        None, None, None]
  if qs is not None:
    seg = (qs[:, :, None] == ks[:, None, :])[:, None, None]
    allowed = seg if allowed is None else jnp.logical_and(allowed, seg)
  return s, allowed


def _einsum_fwd(cfg: _Ring, q, k, v, qs, ks, causal: bool):
  s, allowed = _einsum_scores(cfg, q, k, qs, ks, causal)
  if allowed is not None:
    s = jnp.where(allowed, s, _NEG)
  m = jnp.max(s, axis=-1)
  p = jnp.exp(s - m[..., None])
  if allowed is not None:
    p = jnp.where(allowed, p, 0.0)
  l = jnp.sum(p, axis=-1)
  seen = l > 0.0
  out = jnp.einsum("bhgqs,bshd->bqhgd", p.astype(v.dtype), v,
                   preferred_element_type=jnp.float32, precision=cfg.precision)
  l_out = jnp.where(seen, l, 1.0).transpose(0, 3, 1, 2)[..., None]
  out = (out / l_out).reshape(q.shape[:3] + (v.shape[-1],))
  lse = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), _EMPTY)
  b, hkv, g, lq = lse.shape
  return out.astype(q.dtype), lse.reshape(b, hkv * g, lq)


def _einsum_bwd(cfg: _Ring, q, k, v, qs, ks, out, lse, dout, causal: bool):
  b, lq, h, d = q.shape
  hkv = k.shape[2]
  s, allowed = _einsum_scores(cfg, q, k, qs, ks, causal)
  lse5 = lse.reshape(b, hkv, h // hkv, lq)
  p = jnp.exp(s - lse5[..., None])
  if allowed is not None:
    p = jnp.where(allowed, p, 0.0)
  do5 = dout.reshape(b, lq, hkv, h // hkv, -1).astype(jnp.float32)
  o5 = out.reshape(b, lq, hkv, h // hkv, -1).astype(jnp.float32)
  delta = jnp.einsum("bqhgd,bqhgd->bhgq", do5, o5)
  dv = jnp.einsum("bhgqs,bqhgd->bshd", p, do5, precision=cfg.precision)
  dp = jnp.einsum("bqhgd,bshd->bhgqs", do5, v.astype(jnp.float32), precision=cfg.precision)
  ds = p * (dp - delta[..., None]) * cfg.scale
  dq = jnp.einsum("bhgqs,bshd->bqhgd", ds, k.astype(jnp.float32), precision=cfg.precision)
  dk = jnp.einsum("bhgqs,bqhgd->bshd", ds,
                  q.reshape(b, lq, hkv, h // hkv, d).astype(jnp.float32),
                  precision=cfg.precision)
  return dq.reshape(q.shape), dk, dv


def _block_fwd(cfg: _Ring, q, k, v, qs, ks, causal: bool):
  """``(out float32 [B, Q, H, Dv], lse [B, H, Q])`` with ``_NEG`` for empty rows."""
  if cfg.impl == "einsum":
    out, lse = _einsum_fwd(cfg, q, k, v, qs, ks, causal)
  elif cfg.impl == "pallas":
    from kernels.flash_attention import api  # pylint: disable=g-import-not-at-top
    out, lse = api.flash_attention_with_lse(
        q, k, v, is_causal=causal, segment_ids=None if qs is None else (qs, ks),
        scale=cfg.scale, precision=cfg.precision)
  else:
    out, lse = chunked_lib.attention_with_lse(
        q, k, v, is_causal=causal, q_segment_ids=qs, kv_segment_ids=ks, scale=cfg.scale,
        precision=cfg.precision)
  lse = jnp.where(lse > 1e29, _NEG, lse)
  return out.astype(jnp.float32), lse


def _block_bwd(cfg: _Ring, q, k, v, qs, ks, out, lse, dout, causal: bool):
  """Float32 ``(dq, dk, dv)`` of this block given the merged ``out`` and ``lse``."""
  if cfg.impl == "einsum":
    grads = _einsum_bwd(cfg, q, k, v, qs, ks, out, lse, dout, causal)
  elif cfg.impl == "pallas":
    from kernels.flash_attention import api  # pylint: disable=g-import-not-at-top
    grads = api.flash_attention_backward(
        q, k, v, out, lse, dout, is_causal=causal,
        segment_ids=None if qs is None else (qs, ks), scale=cfg.scale,
        precision=cfg.precision)
  else:
    grads = chunked_lib.attention_backward(
        q, k, v, out, lse, dout, is_causal=causal, q_segment_ids=qs, kv_segment_ids=ks,
        scale=cfg.scale, precision=cfg.precision)
  return tuple(g.astype(jnp.float32) for g in grads)


def _half(x, which: int, axis: int = 1):
  if x is None:
    return None
  h = x.shape[axis] // 2
  return lax.slice_in_dim(x, which * h, (which + 1) * h, axis=axis)


def _pad_half(x, which: int, axis: int, value):
  """``x`` (one half) placed into a full-length array filled with ``value``."""
  widths = [(0, 0)] * x.ndim
  widths[axis] = (x.shape[axis], 0) if which else (0, x.shape[axis])
  return jnp.pad(x, widths, constant_values=value)


def _step_fwd(cfg: _Ring, kind, q, qs, kv):
  """Partial ``(out, lse)`` of the local queries against one visiting K/V block.

  ``kind``: 0 = the device's own block (causal if ``cfg.causal``); under the zigzag
  layout 1 = a block from an earlier device (all queries x its first half), 2 = from a
  later device (the second half of the queries x all of it). A traced ``kind`` picks
  with ``lax.switch``.
  """
  k, v, ks = kv
  if not cfg.causal:
    return _block_fwd(cfg, q, k, v, qs, ks, False)

  def own(_):
    return _block_fwd(cfg, q, k, v, qs, ks, True)

  def earlier(_):
    return _block_fwd(cfg, q, _half(k, 0), _half(v, 0), qs, _half(ks, 0), False)

  def later(_):
    out, lse = _block_fwd(cfg, _half(q, 1), k, v, _half(qs, 1), ks, False)
    return _pad_half(out, 1, 1, 0.0), _pad_half(lse, 1, 2, _NEG)

  if isinstance(kind, int):
    return (own, earlier, later)[kind](None)
  return lax.switch(kind, (earlier, later), None)


def _step_bwd(cfg: _Ring, kind, q, qs, out, lse, dout, kv):
  """This block's float32 ``(dq, dk, dv)`` (see ``_step_fwd`` for ``kind``)."""
  k, v, ks = kv
  if not cfg.causal:
    return _block_bwd(cfg, q, k, v, qs, ks, out, lse, dout, False)

  def own(_):
    return _block_bwd(cfg, q, k, v, qs, ks, out, lse, dout, True)

  def earlier(_):
    dq, dk, dv = _block_bwd(cfg, q, _half(k, 0), _half(v, 0), qs, _half(ks, 0), out, lse,
                            dout, False)
    return dq, _pad_half(dk, 0, 1, 0.0), _pad_half(dv, 0, 1, 0.0)

  def later(_):
    dq, dk, dv = _block_bwd(cfg, _half(q, 1), k, v, _half(qs, 1), ks, _half(out, 1),
                            _half(lse, 1, axis=2), _half(dout, 1), False)
    return _pad_half(dq, 1, 1, 0.0), dk, dv

  if isinstance(kind, int):
    return (own, earlier, later)[kind](None)
  return lax.switch(kind, (earlier, later), None)


def _kind(cfg: _Ring, step) -> Array:
  """0 (earlier device) or 1 (later device) for ``lax.switch`` at ring step >= 1: the
  block held at step ``s`` comes from device ``i - s (mod N)``, earlier iff ``s <= i``."""
  return jnp.where(step <= lax.axis_index(cfg.axis), 0, 1).astype(jnp.int32)


def _merge(acc, part):
  """Log-sum-exp merge of two partial ``(out [B, Q, H, D], lse [B, H, Q])``."""
  if acc is None:
    return part
  (o1, l1), (o2, l2) = acc, part
  lse = jnp.logaddexp(l1, l2)
  w1 = jnp.swapaxes(jnp.exp(l1 - lse), 1, 2)[..., None]
  w2 = jnp.swapaxes(jnp.exp(l2 - lse), 1, 2)[..., None]
  return o1 * w1 + o2 * w2, lse


def _finish(cfg: _Ring, q, acc):
  out, lse = acc
  empty = lse < 0.5 * _NEG
  out = jnp.where(jnp.swapaxes(empty, 1, 2)[..., None], 0.0, out).astype(q.dtype)
  return out, jnp.where(empty, _EMPTY, lse)


def _ring_loop(cfg: _Ring, q, kv0, step_fn, state0, send_state):
  """The ring: at step ``s`` the device holds the K/V block of device ``i - s``.

  ``step_fn(kind, kv, state) -> state`` does the block work; ``send_state(state)``
  passes what must travel with the block (the backward's dK/dV) to the next device
  after the work. The next K/V ``ppermute`` is issued before the block's work.
  """
  n = cfg.size
  perm = [(j, (j + 1) % n) for j in range(n)]
  send = lambda tree: jax.tree.map(lambda x: lax.ppermute(x, cfg.axis, perm), tree)  # noqa
  kind_of = (lambda s: _kind(cfg, s)) if cfg.causal else (lambda s: None)

  nxt = send(kv0)
  state = send_state(step_fn(0, kv0, state0))
  kv = nxt

  def middle(s, carry):
    kv, state = carry
    nxt = send(kv)
    state = send_state(step_fn(kind_of(s), kv, state))
    return nxt, state

  if n > 2:
    kv, state = lax.fori_loop(1, n - 1, middle, (kv, state))
  if n > 1:
    state = send_state(step_fn(kind_of(n - 1), kv, state))
  return state


def _empty(q, dv: int):
  """The accumulator before the first merge: out 0 [B, Lq, H, dv] and lse -inf
  [B, H, Lq], so that the first block merged into it is taken as it is."""
  return (jnp.zeros(q.shape[:3] + (dv,), jnp.float32),
          jnp.full((q.shape[0], q.shape[2], q.shape[1]), _NEG, jnp.float32))


def _ring_forward(cfg: _Ring, q, k, v, qs, ks):
  def step(kind, kv, acc):
    return _merge(acc, _step_fwd(cfg, kind, q, qs, kv))

  acc = _ring_loop(cfg, q, (k, v, ks), step, _empty(q, v.shape[-1]), lambda s: s)
  return _finish(cfg, q, acc)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _ring(cfg: _Ring, q, k, v, qs, ks):
  return _ring_forward(cfg, q, k, v, qs, ks)[0]


def _ring_fwd(cfg: _Ring, q, k, v, qs, ks):
  out, lse = _ring_forward(cfg, q, k, v, qs, ks)
  return out, (q, k, v, qs, ks, out, lse)


def _ring_bwd(cfg: _Ring, res, dout):
  q, k, v, qs, ks, out, lse = res
  n = cfg.size
  perm = [(j, (j + 1) % n) for j in range(n)]

  def step(kind, kv, state):
    dq, dk, dv = state
    gq, gk, gv = _step_bwd(cfg, kind, q, qs, out, lse, dout, kv)
    return dq + gq, dk + gk, dv + gv

  def send_acc(state):
    # dK/dV of the visiting block travel with it (N hops: the last one brings them home).
    dq, dk, dv = state
    return dq, lax.ppermute(dk, cfg.axis, perm), lax.ppermute(dv, cfg.axis, perm)

  zeros = lambda x: jnp.zeros(x.shape, jnp.float32)  # noqa: E731
  dq, dk, dv = _ring_loop(cfg, q, (k, v, ks), step, (zeros(q), zeros(k), zeros(v)),
                          send_acc)
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None


_ring.defvjp(_ring_fwd, _ring_bwd)


# --------------------------------------------------------------------------------------
# All-gather K/V: the same schedule over slices of the gathered blocks.
# --------------------------------------------------------------------------------------


def _gathered_loop(cfg: _Ring, k_all, step_fn, state):
  n = cfg.size
  block = k_all.shape[1] // n
  me = lax.axis_index(cfg.axis)
  kind_of = (lambda s: _kind(cfg, s)) if cfg.causal else (lambda s: None)

  def body(s, state):
    src = (me - s) % n
    return step_fn(kind_of(s), src * block, state)

  state = step_fn(0, me * block, state)
  return lax.fori_loop(1, n, body, state) if n > 1 else state


def _slice(x, start, size):
  return None if x is None else lax.dynamic_slice_in_dim(x, start, size, axis=1)


def _gathered_forward(cfg: _Ring, q, k_all, v_all, qs, ks_all):
  size = k_all.shape[1] // cfg.size

  def step(kind, start, acc):
    kv = (_slice(k_all, start, size), _slice(v_all, start, size), _slice(ks_all, start, size))
    return _merge(acc, _step_fwd(cfg, kind, q, qs, kv))

  return _finish(cfg, q, _gathered_loop(cfg, k_all, step, _empty(q, v_all.shape[-1])))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _gathered(cfg: _Ring, q, k_all, v_all, qs, ks_all):
  return _gathered_forward(cfg, q, k_all, v_all, qs, ks_all)[0]


def _gathered_fwd(cfg: _Ring, q, k_all, v_all, qs, ks_all):
  out, lse = _gathered_forward(cfg, q, k_all, v_all, qs, ks_all)
  return out, (q, k_all, v_all, qs, ks_all, out, lse)


def _gathered_bwd(cfg: _Ring, res, dout):
  q, k_all, v_all, qs, ks_all, out, lse = res
  size = k_all.shape[1] // cfg.size

  def step(kind, start, state):
    dq, dk, dv = state
    kv = (_slice(k_all, start, size), _slice(v_all, start, size), _slice(ks_all, start, size))
    gq, gk, gv = _step_bwd(cfg, kind, q, qs, out, lse, dout, kv)
    add = lambda acc, g: lax.dynamic_update_slice_in_dim(  # noqa: E731
        acc, _slice(acc, start, size) + g, start, axis=1)
    return dq + gq, add(dk, gk), add(dv, gv)

  zeros = lambda x: jnp.zeros(x.shape, jnp.float32)  # noqa: E731
  dq, dk, dv = _gathered_loop(cfg, k_all, step, (zeros(q), zeros(k_all), zeros(v_all)))
  return dq.astype(q.dtype), dk.astype(k_all.dtype), dv.astype(v_all.dtype), None, None


_gathered.defvjp(_gathered_fwd, _gathered_bwd)
