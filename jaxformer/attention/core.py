"""Scaled dot-product attention: one function, four implementations.

``dot_product_attention`` validates its inputs, picks an implementation and calls it:

| name        | where             | memory    | can do                                          |
|-------------|-------------------|-----------|-------------------------------------------------|
| ``"xla"``     | everywhere        | O(N^2)    | everything (the readable reference, below)      |
| ``"chunked"`` | everywhere        | O(N·block)| all but bias / hard / weights / dropout         |
| ``"pallas"``  | GPU / TPU         | O(N)      | what ``kernels.flash_attention.supports`` says  |
| ``"cudnn"``   | NVIDIA GPU        | O(N)      | via ``jax.nn.dot_product_attention``; no hard /  |
|             |                   |           | weights / dropout, bf16/fp16 only              |

An option that the chosen path cannot do never changes the math: with
``implementation=None`` the dispatcher falls back to a path that can (and logs why: at
INFO level, or as a WARNING, once per shape, when a GPU/TPU call lands on the O(N^2)
``xla`` or the ``chunked`` path, a fallback nobody asked for); when the caller names a
path, it raises ``ValueError`` instead. cuDNN is never handed a call it rejects
(``_cannot``): the rules of JAX's own checks (``jax/_src/cudnn/fused_attention_stablehlo.py``:
``check_layout``, ``check_is_flash_attention``) are applied before choosing it.

``implementation=None`` on a GPU is never slower than cuDNN by assumption: it picks
cuDNN wherever cuDNN computes the call, and the Pallas kernel there only where this
device kind's committed benchmark table shows it faster (``gpu_table.py``); it logs
why it picked what it picked (INFO).

Layout: ``query [B, Lq, H, Dqk]``, ``key [B, Lk, Hkv, Dqk]``, ``value [B, Lk, Hkv, Dv]``
with ``H % Hkv == 0`` (grouped-query attention: query head ``h`` reads key/value head
``h // (H // Hkv)``); output ``[B, Lq, H, Dv]`` in the query dtype; weights
``[B, H, Lq, Lk]`` float32.
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp

from jaxformer.attention import chunked as chunked_lib
from jaxformer.attention import gpu_table
from jaxformer.attention import masks
from jaxformer.attention import ring as ring_lib
from jaxformer.attention import validation

Array = jax.Array

logger = logging.getLogger(__name__)

IMPLEMENTATIONS = validation.IMPLEMENTATIONS

# "chunked" replaces "xla" (when no fused kernel applies) once Lq * Lk reaches this many
# scores; below it the N^2 einsum is as fast and its memory is small (see chunked.py).
CHUNKED_MIN_SCORES = 1024 * 1024

_GPU_PLATFORMS = ("gpu", "cuda", "rocm")

# cuDNN flash attention's head dim: JAX's check_is_flash_attention allows <= 256 on
# compute capability >= 9.0 (<= 128 below), whatever the cuDNN version; cuDNN releases
# before 9.13 had Hopper backward bugs for large head dims (introduced in 9.11, fixed in
# 9.13, per cudnn-frontend 1.14.1's notes) and older ones are unchecked here, so heads
# above 128 go to cuDNN from 9.13 on.
CUDNN_HEAD_DIM_256_MIN_VERSION = 91300


def dot_product_attention(
    query: Array,
    key: Array,
    value: Array,
    *,
    mask: Array | None = None,
    bias: Array | None = None,
    is_causal: bool = False,
    segment_ids: Array | tuple[Array, Array] | None = None,
    scale: float | None = None,
    hard: bool | str = False,
    return_weights: bool = False,
    implementation: str | None = None,
    dropout_rate: float = 0.0,
    dropout_rng: Array | None = None,
    precision: str | jax.lax.Precision | None = None,
    context_parallel: str | None = None,
) -> Array | tuple[Array, Array]:
  """Multi-head scaled dot-product attention, ``softmax(scale * q k^T + bias) v``.

  Args:
    query: ``[B, Lq, H, Dqk]``.
    key: ``[B, Lk, Hkv, Dqk]``, ``H % Hkv == 0``.
    value: ``[B, Lk, Hkv, Dv]``.
    mask: bool, True = may attend, broadcastable to ``[B, H, Lq, Lk]``.
    bias: float, added to the scaled logits, broadcastable to ``[B, H, Lq, Lk]``.
    is_causal: query ``i`` attends to keys ``<= i + Lk - Lq`` (bottom-right aligned, the
      decoding convention when ``Lq < Lk``).
    segment_ids: int ``[B, L]`` (self attention, ``Lq == Lk == L``) or a pair
      ``(q_ids [B, Lq], kv_ids [B, Lk])``; attend iff the ids are equal (0 is not
      special).
    scale: multiplies the logits (inverse temperature); default ``1 / sqrt(Dqk)``.
    hard: arg-max attention: the weights are the one-hot of the best allowed key (first
      on ties) and the output is that key's value. ``True``: gradients reach ``value``
      only (the one-hot is a step function of ``q·k``). ``"straight_through"``: the
      same one-hot forward, with the softmax's gradient (of ``scale * q k^T + bias``)
      in the backward pass, so queries and keys train too. xla path only.
    return_weights: also return the ``[B, H, Lq, Lk]`` float32 weights (xla path).
    implementation: ``None`` (pick), ``"xla"``, ``"chunked"``, ``"pallas"``, ``"cudnn"``.
    dropout_rate: dropout on the attention weights (xla path); needs ``dropout_rng``.
    dropout_rng: PRNG key for the dropout; dropout is off when this is None.
    precision: of the matmuls (``"default"``, ``"high"``, ``"highest"`` or a
      ``jax.lax.Precision``). None: the Pallas kernel computes float32 inputs in IEEE
      float32 (never silently TF32); xla/chunked follow JAX's default (on a GPU, TF32 for
      float32 unless ``jax.default_matmul_precision`` says otherwise); cuDNN has no
      float32 path. Pass ``"highest"`` for float32 accuracy on every path.
    context_parallel: ``"ring"`` or ``"all_gather"``: how to compute when the active
      mesh and rules shard the length axis over a ``context`` axis of size > 1
      (``ring.py``); None = ``ring.context_parallel(...)``'s setting (default "ring").
  Returns:
    ``out [B, Lq, H, Dv]`` in the dtype of ``query``; with ``return_weights`` the pair
    ``(out, weights)``. A query with no allowed key gets zeros (and zero gradients).
  Raises:
    ValueError / TypeError: bad shapes, dtypes or options (a non-finite ``scale``
      included), before any tracing.
  """
  validation.validate(query, key, value, mask, bias, segment_ids, implementation, scale,
                      dropout_rate, precision)
  check_hard(hard)
  q_seg, kv_seg = validation.split_segment_ids(segment_ids)
  if mask is not None:
    mask = _to_rank4(jnp.asarray(mask))
  if bias is not None:
    bias = _to_rank4(jnp.asarray(bias))
  scale = float(query.shape[-1] ** -0.5 if scale is None else scale)
  use_dropout = dropout_rate > 0.0 and dropout_rng is not None
  opts = dict(has_mask=mask is not None, has_bias=bias is not None, hard=hard,
              return_weights=return_weights, dropout=use_dropout)
  if context_parallel is not None:
    ring_lib.check_mode(context_parallel)
  out = _context_parallel(query, key, value, mask, q_seg, kv_seg, is_causal, scale,
                          precision, implementation, context_parallel, **opts)
  if out is not None:
    return out

  impl = implementation
  if impl is None:
    impl = _choose_implementation(query, key, value, q_seg, kv_seg, is_causal, **opts)
  else:
    reason = _cannot(impl, query, key, value, q_seg, kv_seg, is_causal, **opts)
    if reason is not None:
      raise ValueError(f"dot_product_attention: implementation={impl!r} cannot be used: "
                       f"{reason}. Use implementation=None to fall back automatically, "
                       f"or 'xla', which supports every option.")

  if impl == "xla":
    out, weights = xla_attention(query, key, value, mask=mask, bias=bias,
                                 is_causal=is_causal, q_segment_ids=q_seg,
                                 kv_segment_ids=kv_seg, scale=scale, hard=hard,
                                 dropout_rate=dropout_rate if use_dropout else 0.0,
                                 dropout_rng=dropout_rng, precision=precision)
    return (out, weights) if return_weights else out
  if impl == "chunked":
    return chunked_lib.chunked_attention(query, key, value, is_causal=is_causal,
                                         q_segment_ids=q_seg, kv_segment_ids=kv_seg,
                                         mask=mask, scale=scale, precision=precision)
  if impl == "pallas":
    flash_attention, _ = _load_pallas()
    seg = None if q_seg is None else (q_seg, kv_seg)
    return flash_attention(query, key, value, is_causal=is_causal, segment_ids=seg,
                           scale=scale, precision=precision)
  if impl == "cudnn":
    return _cudnn_attention(query, key, value, mask=mask, bias=bias, is_causal=is_causal,
                            q_segment_ids=q_seg, kv_segment_ids=kv_seg, scale=scale)
  raise AssertionError(impl)  # unreachable: _validate checked the name


HARD_MODES = (False, True, "straight_through")


def check_hard(hard: bool | str, *, field: str = "hard") -> None:
  """Raises ValueError unless ``hard`` is one of :data:`HARD_MODES`."""
  if not (isinstance(hard, bool) or hard == "straight_through"):
    raise ValueError(f"{field}={hard!r}: expected one of {HARD_MODES} (False: softmax; "
                     "True: arg-max, gradients to the values only; 'straight_through': "
                     "arg-max forward, the softmax's gradient)")


# --------------------------------------------------------------------------------------
# The reference path.
# --------------------------------------------------------------------------------------


def xla_attention(query: Array, key: Array, value: Array, *, mask: Array | None = None,
                  bias: Array | None = None, is_causal: bool = False,
                  q_segment_ids: Array | None = None,
                  kv_segment_ids: Array | None = None, scale: float = 1.0,
                  hard: bool | str = False, dropout_rate: float = 0.0,
                  dropout_rng: Array | None = None,
                  precision: str | jax.lax.Precision | None = None
                  ) -> tuple[Array, Array]:
  """Readable einsum attention with a float32 softmax (inputs already validated).

  Query heads are reshaped into ``[Hkv, G]`` groups so that key/value are never
  repeated. ``mask``/``bias`` are rank 4, broadcastable to ``[B, H, Lq, Lk]``.

  Returns:
    ``(out [B, Lq, H, Dv] in query dtype, weights [B, H, Lq, Lk] float32)``.
  """
  batch, q_len, num_heads, _ = query.shape
  _, kv_len, num_kv_heads, v_dim = value.shape
  groups = num_heads // num_kv_heads
  q_BQKGD = query.reshape(batch, q_len, num_kv_heads, groups, query.shape[-1])

  logits_BKGQS = jnp.einsum("bqhgd,bshd->bhgqs", q_BQKGD, key, precision=precision,
                            preferred_element_type=jnp.float32) * scale
  if bias is not None:
    logits_BKGQS = logits_BKGQS + _group_heads(bias.astype(jnp.float32), num_kv_heads)
  allowed = _combined_mask(mask, is_causal, q_segment_ids, kv_segment_ids, q_len, kv_len)
  if allowed is not None:
    allowed = _group_heads(allowed, num_kv_heads)
    big_neg = jnp.finfo(jnp.float32).min
    logits_BKGQS = jnp.where(allowed, logits_BKGQS, big_neg)

  if hard:
    best_BKGQ = jnp.argmax(logits_BKGQS, axis=-1)
    weights_BKGQS = jax.nn.one_hot(best_BKGQ, kv_len, dtype=jnp.float32)
    if hard == "straight_through":
      # Forward: exactly the one-hot (soft - soft is 0); backward: the softmax's.
      soft_BKGQS = jax.nn.softmax(logits_BKGQS, axis=-1)
      weights_BKGQS = weights_BKGQS + (soft_BKGQS - jax.lax.stop_gradient(soft_BKGQS))
  else:
    weights_BKGQS = jax.nn.softmax(logits_BKGQS, axis=-1)
  if allowed is not None:
    # Rows with no allowed key: softmax over all-equal logits is uniform; zero it. The
    # logits there are a finite constant, so the gradients stay finite (and zero).
    any_BKGQ1 = jnp.any(allowed, axis=-1, keepdims=True)
    weights_BKGQS = weights_BKGQS * any_BKGQ1.astype(jnp.float32)

  probs_BKGQS = weights_BKGQS
  if dropout_rate > 0.0:
    if dropout_rng is None:
      raise ValueError("xla_attention: dropout_rate > 0 needs dropout_rng")
    keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, probs_BKGQS.shape)
    probs_BKGQS = jnp.where(keep, probs_BKGQS / (1.0 - dropout_rate), 0.0)

  out_BQKGD = jnp.einsum("bhgqs,bshd->bqhgd", probs_BKGQS.astype(value.dtype), value,
                         precision=precision, preferred_element_type=jnp.float32)
  out_BQHD = out_BQKGD.reshape(batch, q_len, num_heads, v_dim).astype(query.dtype)
  weights_BHQS = weights_BKGQS.reshape(batch, num_heads, q_len, kv_len)
  return out_BQHD, weights_BHQS


def _combined_mask(mask: Array | None, is_causal: bool, q_seg: Array | None,
                   kv_seg: Array | None, q_len: int, kv_len: int) -> Array | None:
  """The conjunction of the explicit, causal and segment masks (:mod:`.masks`), rank 4
  (or None)."""
  allowed = None if mask is None else mask.astype(bool)
  for part in (masks.make_causal_mask(q_len, kv_len) if is_causal else None,
               None if q_seg is None else masks.make_segment_mask(q_seg, kv_seg)):
    if part is not None:
      allowed = part if allowed is None else jnp.logical_and(allowed, part)
  return allowed


def _group_heads(x_BHQS: Array, num_kv_heads: int) -> Array:
  """``[B, H|1, Q, S]`` -> ``[B, Hkv|1, G|1, Q, S]`` without materialising broadcasts."""
  b, h, q, s = x_BHQS.shape
  if h == 1:
    return x_BHQS[:, :, None]
  return x_BHQS.reshape(b, num_kv_heads, h // num_kv_heads, q, s)


def _to_rank4(x: Array) -> Array:
  return x.reshape((1,) * (4 - x.ndim) + x.shape)


# --------------------------------------------------------------------------------------
# cuDNN through jax.nn.dot_product_attention.
# --------------------------------------------------------------------------------------


def _cudnn_attention(query, key, value, *, mask, bias, is_causal, q_segment_ids,
                     kv_segment_ids, scale) -> Array:
  q_len, kv_len = query.shape[1], key.shape[1]
  # jax.nn's causal flag is top-left aligned: express bottom-right as a mask when needed.
  native_causal = is_causal and q_len == kv_len
  allowed = _combined_mask(mask, is_causal and not native_causal, q_segment_ids,
                           kv_segment_ids, q_len, kv_len)
  # JAX's cuDNN layout check wants the bias (and the mask, which becomes one) at full
  # [.., Lq, Lk]; batch and head axes may stay broadcast (size 1).
  if bias is not None:
    bias = jnp.broadcast_to(bias, bias.shape[:2] + (q_len, kv_len))
  cudnn_mask = allowed
  if cudnn_mask is not None:
    cudnn_mask = jnp.broadcast_to(cudnn_mask, cudnn_mask.shape[:2] + (q_len, kv_len))
  out = jax.nn.dot_product_attention(query, key, value, bias=bias, mask=cudnn_mask,
                                     scale=scale, is_causal=native_causal,
                                     implementation="cudnn")
  if allowed is not None:
    # Keep the contract for rows with no allowed key: zeros.
    if native_causal:
      allowed = _combined_mask(allowed, True, None, None, q_len, kv_len)
    row_ok_BHQ = jnp.any(allowed, axis=-1)
    out = out * jnp.swapaxes(row_ok_BHQ, 1, 2)[..., None].astype(out.dtype)
  return out


# --------------------------------------------------------------------------------------
# Dispatch.
# --------------------------------------------------------------------------------------


def _platform() -> str:
  return jax.default_backend()


def _gpu_capability() -> tuple[int, ...] | None:
  """The first device's CUDA compute capability, e.g. (9, 0), or None."""
  capability = getattr(jax.devices()[0], "compute_capability", None)
  try:
    return tuple(int(x) for x in str(capability).split("."))
  except ValueError:
    return None


def _cudnn_version() -> int | None:
  """cuDNN's version as JAX reports it (91300 = 9.13.0), or None without cuDNN."""
  try:
    from jax._src.lib import cuda_versions  # pylint: disable=g-import-not-at-top
    return None if cuda_versions is None else int(cuda_versions.cudnn_get_version())
  except Exception:  # pylint: disable=broad-except
    return None


def cudnn_max_head_dim() -> tuple[int, str]:
  """The largest head dim handed to cuDNN here, and why (``CUDNN_HEAD_DIM_256_MIN_VERSION``)."""
  capability, version = _gpu_capability(), _cudnn_version()
  if capability is None or capability < (9, 0):
    return 128, f"compute capability {capability} < 9.0"
  if version is None or version < CUDNN_HEAD_DIM_256_MIN_VERSION:
    return 128, f"cuDNN {version} < {CUDNN_HEAD_DIM_256_MIN_VERSION}"
  return 256, f"compute capability {capability}, cuDNN {version}"


def _load_pallas():
  """Imports the Pallas kernel lazily; returns ``(flash_attention, supports)`` or raises."""
  try:
    from kernels.flash_attention import flash_attention, supports  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(f"the Pallas kernel (kernels.flash_attention) could not be "
                      f"imported: {e}") from e
  return flash_attention, supports


def _cannot(impl: str, query, key, value, q_seg, kv_seg, is_causal, *, has_mask,
            has_bias, hard, return_weights, dropout) -> str | None:
  """Why ``impl`` cannot compute this attention here, or None if it can."""
  if impl == "xla":
    return None
  extras = [name for name, on in (("hard", hard), ("return_weights", return_weights),
                                  ("dropout", dropout)) if on]
  if impl in ("chunked", "pallas"):
    extras += [name for name, on in (("mask", has_mask and impl == "pallas"),
                                     ("bias", has_bias)) if on]
  if extras:
    return f"it does not support {', '.join(extras)}"
  platform = _platform()
  if impl == "chunked":
    return "the key sequence is empty" if key.shape[1] == 0 else None
  if impl == "cudnn":
    if platform not in _GPU_PLATFORMS:
      return f"cuDNN needs an NVIDIA GPU; the default backend is {platform!r}"
    if query.dtype not in (jnp.bfloat16, jnp.float16):
      return f"cuDNN attention needs bfloat16/float16 inputs, got {query.dtype}"
    if query.shape[-1] != value.shape[-1]:
      return (f"cuDNN attention needs Dqk == Dv, got {query.shape[-1]} and "
              f"{value.shape[-1]}")
    max_head_dim, why = cudnn_max_head_dim()
    if query.shape[-1] > max_head_dim or query.shape[-1] % 8:
      return (f"cuDNN attention needs head_dim <= {max_head_dim} ({why}) and a multiple"
              f" of 8, got {query.shape[-1]}")
    q_len, kv_len = query.shape[1], key.shape[1]
    as_bias = [name for name, on in (
        ("bias", has_bias), ("mask", has_mask), ("segment_ids", q_seg is not None),
        ("bottom-right causal", is_causal and q_len != kv_len)) if on]
    if as_bias and (q_len % 2 or kv_len % 2):
      return (f"cuDNN's backward takes a bias ({', '.join(as_bias)} reach cuDNN as one)"
              f" only with even lengths (JAX raises under grad), got Lq={q_len},"
              f" Lk={kv_len}")
    return None
  if impl == "pallas":
    try:
      _, supports = _load_pallas()
    except ImportError as e:
      return str(e)
    seg = None if q_seg is None else (q_seg, kv_seg)
    # On the CPU the kernel runs in Pallas interpret mode (for tests): only ask whether it
    # handles these inputs. (The automatic choice never picks pallas on the CPU.)
    check_on = platform if platform in _GPU_PLATFORMS + ("tpu",) else "gpu"
    return supports(query, key, value, segment_ids=seg, platform=check_on)
  raise AssertionError(impl)


def _device_kind() -> str:
  return jax.devices()[0].device_kind


def _choose_implementation(query, key, value, q_seg, kv_seg, is_causal, **opts) -> str:
  """The fastest path that computes exactly this attention on the default backend.

  GPU: cuDNN wherever it computes this call, unless the committed benchmark table of
  this device kind shows the Pallas kernel faster for the case (``gpu_table``); then
  Pallas, chunked (long sequences) or xla. TPU: Pallas. CPU: chunked for long
  sequences, else xla. Every GPU choice, and every fallback, is logged with its reason.
  """
  platform = _platform()
  reasons = []
  if platform in _GPU_PLATFORMS:
    reason = _cannot("cudnn", query, key, value, q_seg, kv_seg, is_causal, **opts)
    if reason is None and (opts["has_mask"] or q_seg is not None
                           or (is_causal and query.shape[1] != key.shape[1])):
      reason = "an explicit mask would be materialised (slow); not chosen automatically"
    if reason is None:
      case = gpu_table.Case.of(query.shape[1], key.shape[1], query.dtype, is_causal,
                               query.shape[-1])
      faster, why = gpu_table.prefer_pallas(_device_kind(), case)
      pallas_reason = _cannot("pallas", query, key, value, q_seg, kv_seg, is_causal,
                              **opts) if faster else None
      if faster and pallas_reason is None:
        logger.info("dot_product_attention: using 'pallas' (faster than cuDNN: %s)", why)
        return "pallas"
      logger.info("dot_product_attention: using 'cudnn' (%s)",
                  why if pallas_reason is None else f"not 'pallas': {pallas_reason}")
      return "cudnn"
    reasons.append(f"not 'cudnn': {reason}")
    candidates = ["pallas"]
  elif platform == "tpu":
    candidates = ["pallas"]
  else:
    candidates = []
  if query.shape[1] * key.shape[1] >= CHUNKED_MIN_SCORES:
    candidates.append("chunked")
  accelerated = platform in _GPU_PLATFORMS + ("tpu",)
  for impl in candidates:
    reason = _cannot(impl, query, key, value, q_seg, kv_seg, is_causal, **opts)
    if reason is None:
      if reasons:
        _log_fallback(accelerated and impl == "chunked", impl, reasons, query, key)
      return impl
    reasons.append(f"not {impl!r}: {reason}")
  if reasons:
    _log_fallback(accelerated, "xla", reasons, query, key)
  return "xla"


_WARNED: set = set()


def _log_fallback(warn: bool, impl: str, reasons: list[str], query, key) -> None:
  """INFO; a WARNING once per shape and reason when a GPU/TPU call gets no fused kernel."""
  message = f"dot_product_attention: using {impl!r} ({'; '.join(reasons)})"
  shape_key = (impl, query.shape, key.shape, str(query.dtype), message)
  if warn and shape_key not in _WARNED:
    _WARNED.add(shape_key)
    logger.warning("%s for query %s, key %s", message, query.shape, key.shape)
  else:
    logger.info("%s", message)


# --------------------------------------------------------------------------------------
# Context parallelism (ring.py): the length axis sharded over a ``context`` mesh axis.
# --------------------------------------------------------------------------------------


def _context_parallel(query, key, value, mask, q_seg, kv_seg, is_causal, scale, precision,
                      implementation, mode, **opts) -> Array | None:
  """The context-parallel result when the active mesh/rules shard the length, else None.

  ``"chunked"``/``"pallas"`` name the ring's block kernel; ``"xla"``/``"cudnn"`` (and
  options the ring cannot do) leave the call to the partitioner, which gathers.
  """
  layout = ring_lib.active_layout(query, key)
  if layout is None:
    return None
  reason = ring_lib.unsupported(has_bias=opts["has_bias"], hard=opts["hard"],
                                return_weights=opts["return_weights"],
                                dropout=opts["dropout"], mask=mask)
  if reason is None and implementation in ("xla", "cudnn"):
    reason = f"implementation={implementation!r} was named"
  if reason is not None:
    logger.info("dot_product_attention: not context parallel (%s); the partitioner "
                "gathers the sharded length axis", reason)
    return None
  return ring_lib.context_parallel_attention(
      query, key, value, layout=layout, is_causal=is_causal, q_segment_ids=q_seg,
      kv_segment_ids=kv_seg, key_mask=mask, scale=scale, precision=precision, mode=mode,
      block_impl=implementation)
