"""Entry point: padding, custom_vjp wiring, platform dispatch (checks.py
validates the inputs).

One jitted `flash_attention` lowers to the Mosaic GPU kernel on Hopper
(cuda, bf16/fp16), to the Triton kernel on other cuda GPUs and rocm, to the
Mosaic kernel on tpu and to the Triton kernel in interpret mode elsewhere
(CPU), via `jax.lax.platform_dependent` inside the custom_vjp's forward and
backward rules (`hopper_gpu` says how the GPU is recognised at trace time).
The custom_vjp's residuals are the *unpadded* operands, output and
log-sum-exp (in the units the backend's own backward reads: base 2 for Triton,
natural for the Mosaic kernels; forward and backward run on the same branch), so
every platform branch has the same residual shapes and does its own padding:
  * Triton reads lengths as they are (masked loads and stores at the ends);
    Mosaic TPU pads them to a multiple of the tiles; padded keys are masked
    in the kernels (`common.allowed`), padded query rows are sliced off (their
    cotangent is zero, their lse +inf so they contribute nothing to dK/dV);
  * head dims are zero-padded to what the hardware wants (a power of two >= 16
    for Triton, a multiple of 128 lanes for Mosaic); zeros change no dot
    product and the extra output columns are sliced off.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from kernels.flash_attention import common
from kernels.flash_attention import gpu
from kernels.flash_attention import gpu_vjp
from kernels.flash_attention import mosaic_gpu
from kernels.flash_attention import mosaic_gpu_vjp
from kernels.flash_attention import tpu
from kernels.flash_attention.block_sizes import BlockSizes
from kernels.flash_attention.block_table import BlockTable
from kernels.flash_attention.block_table import TableKey
from kernels.flash_attention.checks import check_inputs
from kernels.flash_attention.checks import split_segment_ids
from kernels.flash_attention.checks import supports  # noqa: F401 (re-exported)
from kernels.flash_attention.block_sizes import lcm_block
from kernels.flash_attention.block_sizes import next_power_of_2
from kernels.flash_attention.block_sizes import round_up

# Platforms with a compiled kernel, per backend.
NATIVE_PLATFORMS = {"triton": ("cuda", "rocm"), "mosaic": ("tpu",),
                    "mosaic_gpu": ("cuda",)}
_KERNELS = {"triton": (gpu.forward, gpu_vjp.backward),
            "mosaic": (tpu.forward, tpu.backward),
            "mosaic_gpu": (mosaic_gpu.forward, mosaic_gpu_vjp.backward)}
MOSAIC_GPU_DTYPES = (jnp.bfloat16, jnp.float16)
# Device kinds of sm_90 parts, for abstract devices that carry no
# compute_capability (jax.export under an AbstractMesh).
_HOPPER_KINDS = ("H100", "H200", "H800", "H20", "GH200")


def hopper_gpu() -> bool:
  """Whether the cuda device being traced for is a Hopper (sm_90) GPU.

  Decided at trace time, so the choice is static: the abstract mesh's device
  (`jax.sharding.use_abstract_mesh`, e.g. for `jax.export` on a CPU host)
  wins, else the first local cuda device. Its `compute_capability` must be
  9.x: the kernel is built on wgmma, which Blackwell (10.x) does not have.
  Abstract devices without a capability are matched by device kind. No cuda
  device at all (a CPU host exporting without a mesh): False (Triton).
  """
  device = jax.sharding.get_abstract_mesh().abstract_device
  if device is None:
    try:
      device = jax.devices("cuda")[0]
    except RuntimeError:
      return False
  if getattr(device, "platform", "gpu") not in ("gpu", "cuda"):
    return False
  capability = getattr(device, "compute_capability", None)
  if capability is not None:
    return str(capability).split(".")[0] == "9"
  kind = str(getattr(device, "device_kind", "")).upper()
  return any(k in kind for k in _HOPPER_KINDS)

# CUDA runtimes whose ptxas miscompiles causal Mosaic GPU attention: 12.8.0 up to
# (not including) 12.9.1. JAX refuses causal `attention_mgpu` there for this reason
# (jax/experimental/pallas/ops/gpu/attention_mgpu.py, `_attention_forward`); so do we.
PTXAS_CAUSAL_BUG = (12080, 12091)


def cuda_runtime_version() -> int | None:
  """The CUDA runtime's version as an int (12080 = 12.8.0), or None without CUDA."""
  try:
    from jax._src.lib import cuda_versions  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  if cuda_versions is None:
    return None
  try:
    return int(cuda_versions.cuda_runtime_get_version())
  except Exception:  # pylint: disable=broad-except
    return None  # no CUDA runtime loadable (a CPU host)


def mosaic_gpu_causal_refused(is_causal: bool) -> str | None:
  """Why compiled causal Mosaic GPU attention is refused here, or None.

  On CUDA 12.8.0 to 12.9.0 ptxas miscompiles it (``PTXAS_CAUSAL_BUG``). An unknown
  version (no CUDA runtime, e.g. exporting on a CPU host) is not refused.
  """
  version = cuda_runtime_version()
  low, high = PTXAS_CAUSAL_BUG
  if is_causal and version is not None and low <= version < high:
    return (f"causal Mosaic GPU attention is refused on CUDA runtime {version} (12.8.0"
            f" <= version < 12.9.1: a ptxas miscompile, as JAX's attention_mgpu says)")
  return None


_WARNED: set = set()


def warn_once(key, message: str, *args) -> None:
  """A WARNING for a fallback the caller did not ask for, once per ``key`` (shape)."""
  if key in _WARNED:
    return
  _WARNED.add(key)
  logger.warning(message, *args)


def primary_backend(backend: str | None, dtype, is_causal: bool,
                    platform: str | None = None) -> str:
  """The kernel that runs on ``platform`` (default: the default backend's).

  An explicit ``backend`` runs as given; otherwise Mosaic TPU on a TPU, Mosaic GPU on
  a Hopper GPU for bf16/fp16 (unless ``mosaic_gpu_causal_refused``), Triton on other
  GPUs and in interpret mode on a CPU.
  """
  if backend is not None:
    return backend
  platform = platform or jax.default_backend()
  if platform == "tpu":
    return "mosaic"
  if (platform in ("gpu", "cuda") and hopper_gpu()
      and jnp.dtype(dtype) in [jnp.dtype(d) for d in MOSAIC_GPU_DTYPES]
      and mosaic_gpu_causal_refused(is_causal) is None):
    return "mosaic_gpu"
  return "triton"


PRECISIONS = {"default": lax.Precision.DEFAULT, "high": lax.Precision.HIGH,
              "highest": lax.Precision.HIGHEST}

logger = logging.getLogger(__name__)


# ------------------------------------------------------------- the kernel --


@dataclasses.dataclass(frozen=True)
class _Config:
  """Static (hashable) arguments of the custom_vjp."""
  is_causal: bool
  scale: float
  block_sizes: BlockSizes | BlockTable | None
  interpret: bool | None
  backend: str | None
  precision: lax.Precision
  primary: str = "triton"  # the kernel that runs on the default device


def _pad_axis(x, axis: int, size: int, value=0):
  if x is None or x.shape[axis] == size:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, size - x.shape[axis])
  return jnp.pad(x, widths, constant_values=value)


def _plan(cfg: _Config, backend: str, interpret: bool, q_shape, k_shape,
          v_shape, dtype, has_segments: bool):
  """Tiles, padded sizes and the static Problem for one backend."""
  batch, q_len, num_heads, head_dim = q_shape
  kv_len, num_kv_heads, head_dim_v = k_shape[1], k_shape[2], v_shape[3]
  blocks = cfg.block_sizes
  if isinstance(blocks, BlockTable):
    blocks = blocks.lookup(TableKey.of(
        backend, q_shape, k_shape, v_shape, dtype, causal=cfg.is_causal,
        segments=has_segments))
  if blocks is not None:
    blocks = blocks.fit(q_len, kv_len, backend)
    try:
      blocks.validate(backend, interpret=interpret)
    except ValueError:
      if backend == cfg.primary:
        raise  # an invalid explicit choice for the kernel that runs: an error
      # Tiles for the kernel that runs here do not suit a branch traced for another
      # platform (lax.platform_dependent traces every branch; this one never runs on
      # this device): that branch takes its defaults. To export with given tiles for
      # another platform, name its backend (backend=...), which makes it primary.
      blocks = None
  if blocks is None:
    blocks = BlockSizes.get_default(backend, max(head_dim, head_dim_v)).fit(
        q_len, kv_len, backend)
  if backend == "triton":
    pad_dim = lambda d: next_power_of_2(max(d, 16))  # noqa: E731
  elif backend == "mosaic_gpu":  # 128-byte swizzled bf16/fp16 rows
    pad_dim = lambda d: round_up(d, mosaic_gpu.HEAD_DIM_MULTIPLE)  # noqa
  else:
    pad_dim = lambda d: round_up(d, 128)  # noqa: E731
  q_len_padded = round_up(q_len, lcm_block(blocks.q_blocks()))
  kv_len_padded = round_up(kv_len, lcm_block(blocks.k_blocks()))
  problem = common.Problem(
      q_len=q_len, kv_len=kv_len, q_len_padded=q_len_padded,
      kv_len_padded=kv_len_padded, causal=cfg.is_causal, scale=cfg.scale,
      has_segments=has_segments, group=num_heads // num_kv_heads,
      precision=cfg.precision)
  del batch
  return blocks, problem, pad_dim(head_dim), pad_dim(head_dim_v)


def _length_padding(backend: str, p: common.Problem,
                    blocks: BlockSizes) -> tuple[int, int]:
  """Lengths the operands are padded to. Triton masks its loads at the end
  instead; it pads only a sequence shorter than one tile (a static slice may
  not be larger than the array), which is a small copy."""
  if backend == "triton":
    return (max(p.q_len, *blocks.q_blocks()),
            max(p.kv_len, *blocks.k_blocks()))
  return p.q_len_padded, p.kv_len_padded


def _run_forward(backend: str, interpret: bool, cfg: _Config, q, k, v, q_ids,
                 kv_ids):
  blocks, p, dqk, dv = _plan(cfg, backend, interpret, q.shape, k.shape,
                             v.shape, q.dtype, q_ids is not None)
  q_len, head_dim_v = q.shape[1], v.shape[3]
  q_pad, kv_pad = _length_padding(backend, p, blocks)
  out, lse = _KERNELS[backend][0](
      _pad_axis(_pad_axis(q, 1, q_pad), 3, dqk),
      _pad_axis(_pad_axis(k, 1, kv_pad), 3, dqk),
      _pad_axis(_pad_axis(v, 1, kv_pad), 3, dv),
      _pad_axis(q_ids, 1, q_pad), _pad_axis(kv_ids, 1, kv_pad),
      p=p, block_sizes=blocks, interpret=interpret)
  return out[:, :q_len, :, :head_dim_v], lse[:, :, :q_len]


def _run_backward(backend: str, interpret: bool, cfg: _Config, q, k, v, q_ids,
                  kv_ids, out, lse, dout):
  blocks, p, dqk, dv = _plan(cfg, backend, interpret, q.shape, k.shape,
                             v.shape, q.dtype, q_ids is not None)
  q_pad, kv_pad = _length_padding(backend, p, blocks)
  pad_q = lambda x, d: _pad_axis(_pad_axis(x, 1, q_pad), 3, d)  # noqa
  pad_k = lambda x, d: _pad_axis(_pad_axis(x, 1, kv_pad), 3, d)  # noqa
  dq, dk, dv_ = _KERNELS[backend][1](
      pad_q(q, dqk), pad_k(k, dqk), pad_k(v, dv),
      _pad_axis(q_ids, 1, q_pad), _pad_axis(kv_ids, 1, kv_pad),
      pad_q(out, dv), _pad_axis(lse, 2, q_pad, value=np.inf),
      pad_q(dout.astype(q.dtype), dv),
      p=p, block_sizes=blocks, interpret=interpret)
  q_len, kv_len = q.shape[1], k.shape[1]
  return (dq[:, :q_len, :, :q.shape[3]], dk[:, :kv_len, :, :k.shape[3]],
          dv_[:, :kv_len, :, :v.shape[3]])


def _dispatch(run, cfg: _Config, *args):
  """Calls `run(backend, interpret, cfg, *args)` on the right kernel."""
  if cfg.backend is not None:
    backends = {plat: cfg.backend for plat in NATIVE_PLATFORMS[cfg.backend]}
    default = cfg.backend
  else:
    cuda = "triton"
    if hopper_gpu() and jnp.dtype(args[0].dtype) in [jnp.dtype(d) for d in
                                                      MOSAIC_GPU_DTYPES]:
      refused = mosaic_gpu_causal_refused(cfg.is_causal)
      if refused is None:
        cuda = "mosaic_gpu"
      else:
        warn_once(("ptxas", args[0].shape, args[1].shape, args[0].dtype),
                  "flash_attention: Triton instead of Mosaic GPU for q %s, k %s: %s.",
                  args[0].shape, args[1].shape, refused)
    backends = {"cuda": cuda, "rocm": "triton", "tpu": "mosaic"}
    default = "triton"
  if cfg.interpret:  # everywhere in interpret mode: no dispatch needed
    if cfg.backend is None:
      return jax.lax.platform_dependent(
          *args, tpu=functools.partial(run, "mosaic", True, cfg),
          default=functools.partial(run, "triton", True, cfg))
    return run(default, True, cfg, *args)
  branches = {plat: functools.partial(run, b, False, cfg)
              for plat, b in backends.items()}
  # interpret=None: interpret where there is no compiler; False: never.
  default_interpret = cfg.interpret is None
  return jax.lax.platform_dependent(
      *args, default=functools.partial(run, default, default_interpret, cfg),
      **branches)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _flash(q, k, v, q_ids, kv_ids, cfg: _Config):
  return _dispatch(_run_forward, cfg, q, k, v, q_ids, kv_ids)[0]


def _flash_fwd(q, k, v, q_ids, kv_ids, cfg: _Config):
  out, lse = _dispatch(_run_forward, cfg, q, k, v, q_ids, kv_ids)
  return out, (q, k, v, q_ids, kv_ids, out, lse)


def _flash_bwd(cfg: _Config, residuals, dout):
  q, k, v, q_ids, kv_ids, out, lse = residuals
  dq, dk, dv = _dispatch(_run_backward, cfg, q, k, v, q_ids, kv_ids, out, lse,
                         dout)
  return dq, dk, dv, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def _precision(precision, dtype) -> lax.Precision:
  """The matmul precision: explicit, or HIGHEST for float32 (module doc)."""
  if precision is None:
    return (lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32
            else lax.Precision.DEFAULT)
  if isinstance(precision, lax.Precision):
    return precision
  if isinstance(precision, str) and precision.lower() in PRECISIONS:
    return PRECISIONS[precision.lower()]
  raise ValueError(f"precision must be None, one of {tuple(PRECISIONS)} or a"
                   f" jax.lax.Precision, got {precision!r}.")


def flash_attention(query: jax.Array, key: jax.Array, value: jax.Array, *,
                    is_causal: bool = False, segment_ids=None,
                    scale: float | None = None,
                    block_sizes: BlockSizes | BlockTable | None = None,
                    interpret: bool | None = None,
                    backend: str | None = None,
                    precision: str | lax.Precision | None = None) -> jax.Array:
  """Fused, memory-efficient softmax attention (FlashAttention-2 algorithm).

  Never materialises the [Lq, Lk] score matrix; differentiable (custom VJP
  with fused backward kernels). Same semantics as jaxformer's
  `dot_product_attention`.

  Args:
    query: [batch, q_len, heads, head_dim] bfloat16/float16/float32.
    key: [batch, kv_len, kv_heads, head_dim]; heads % kv_heads == 0
      (grouped-query attention, no K/V repeat).
    value: [batch, kv_len, kv_heads, head_dim_v] (head_dim_v may differ).
    is_causal: causal mask, bottom-right aligned when q_len != kv_len (query
      row r sees keys c <= r + kv_len - q_len, as in decoding with a cache).
    segment_ids: int [batch, length] for self attention, or a pair
      (q_ids [batch, q_len], kv_ids [batch, kv_len]); a query attends a key
      iff their ids are equal (0 is not special).
    scale: logits multiplier; default 1/sqrt(head_dim).
    block_sizes: tiles: a `BlockSizes`; or a `BlockTable` (tuned tiles read
      from JSON, see autotune.py), whose entry for this call is used; None,
      or no entry, = `BlockSizes.get_default(backend, head_dim)`. Tiles that
      break the rules of the kernel that runs here (`primary_backend`: Mosaic
      GPU on Hopper for bf16/fp16) raise ValueError; they are never replaced.
    interpret: None = compiled on GPU/TPU, Pallas interpret mode elsewhere
      (CPU); True = interpret mode everywhere; False = never interpret.
    backend: None = Mosaic GPU on Hopper for bf16/fp16 (`hopper_gpu`; causal
      calls on CUDA 12.8.0-12.9.0 take Triton, with a WARNING once per shape:
      `mosaic_gpu_causal_refused`), Triton on other GPUs, Mosaic on TPU; "triton", "mosaic" or
      "mosaic_gpu" forces one kernel (e.g. to test the Mosaic kernel in
      interpret mode on a CPU; "mosaic_gpu" interprets under jax's
      `force_gpu_interpret_mode`, see tests/kernels/mosaic_gpu_interpret.py).
    precision: of the kernel's matmuls: "default", "high", "highest" or a
      `jax.lax.Precision`. None (the default) = "highest" for float32 inputs
      (IEEE float32 products, never silently TF32 on a GPU) and "default"
      for bfloat16/float16 (which have one precision). Pass "default" with
      float32 inputs to allow TF32 on Ampere and newer GPUs (faster, about 10
      mantissa bits).
  Returns:
    [batch, q_len, heads, head_dim_v] in query's dtype (float32 accumulation);
    rows with no allowed key are zeros.
  Raises:
    ValueError/TypeError for unsupported shapes, dtypes, head_dim > 256 or
    segment ids, before any tracing.
  """
  problem = check_inputs(query, key, value, segment_ids)
  if problem is not None:
    raise problem[0](problem[1])
  if backend not in (None, *NATIVE_PLATFORMS):
    raise ValueError(f"backend must be None, 'triton', 'mosaic' or"
                     f" 'mosaic_gpu', got {backend!r}.")
  if backend == "mosaic_gpu" and jnp.dtype(query.dtype) not in [
      jnp.dtype(d) for d in MOSAIC_GPU_DTYPES]:
    raise TypeError(f"backend='mosaic_gpu' takes bfloat16 or float16 inputs"
                    f" (wgmma would run float32 as TF32), got {query.dtype}.")
  if interpret not in (None, True, False):
    raise ValueError(f"interpret must be None, True or False, got"
                     f" {interpret!r}.")
  if block_sizes is not None and not isinstance(block_sizes,
                                                (BlockSizes, BlockTable)):
    raise TypeError(f"block_sizes must be a BlockSizes, a BlockTable or None,"
                    f" got {type(block_sizes).__name__}.")
  if isinstance(block_sizes, BlockTable) and block_sizes.device_kind not in (
      None, jax.devices()[0].device_kind):
    logger.warning("flash_attention: the BlockTable was tuned on %r, this"
                   " device is %r; its tiles may not suit it.",
                   block_sizes.device_kind, jax.devices()[0].device_kind)
  platform = jax.default_backend()
  if interpret is True and backend is None:  # _dispatch's interpret-mode branches
    runs = "mosaic" if platform == "tpu" else "triton"
  else:
    runs = primary_backend(backend, query.dtype, is_causal)
  if backend == "mosaic_gpu" and interpret is not True:
    refused = mosaic_gpu_causal_refused(is_causal)
    if refused is not None:
      raise ValueError(f"flash_attention(backend='mosaic_gpu'): {refused}; use"
                       f" backend='triton' or backend=None (which then picks Triton).")
  if isinstance(block_sizes, BlockSizes):
    # The tiles must suit the kernel that runs on the default device (an error if
    # not); branches traced for other platforms take their default tiles (_plan).
    block_sizes.fit(query.shape[1], key.shape[1], runs).validate(
        runs, interpret=bool(interpret) or (
            interpret is None and platform not in NATIVE_PLATFORMS[runs]))
  if scale is None:
    scale = 1.0 / math.sqrt(query.shape[-1])
  elif not isinstance(scale, (int, float)) or not math.isfinite(scale):
    raise ValueError(f"scale must be a finite Python number (it is static),"
                     f" got {scale!r}.")
  precision = _precision(precision, query.dtype)
  q_ids, kv_ids = split_segment_ids(segment_ids, query.shape[1],
                                     key.shape[1])
  if q_ids is not None:
    q_ids, kv_ids = q_ids.astype(jnp.int32), kv_ids.astype(jnp.int32)
  cfg = _Config(is_causal=bool(is_causal), scale=float(scale),
                block_sizes=block_sizes, interpret=interpret, backend=backend,
                precision=precision, primary=runs)
  return _flash(query, key, value, q_ids, kv_ids, cfg)
