"""Attention maps out of any model: weights per layer, ViT rollout, axial maps.

Every ``MultiHeadAttention`` can sow its weights into the 'intermediates' collection
(``return_weights=True``). :func:`capture_attention` turns that on for every attention
module of any model through a Flax method interceptor, so the maps come out of a plain
forward pass of an unchanged model (also for models whose config has no
``return_weights``, e.g. the axial transformers):

```python
maps = attention_weights(model, variables, tokens_BL)   # {"decoder/layers_0/self_attention":
                                                         #   [B, H, Lq, Lk] float32, ...}
grid_BHW = vit_rollout(model, variables, images_BHWC)   # [CLS] -> patch rollout
rows, cols = axial_attention_maps(model, variables, images_BHWC)
```

:func:`override_attention` uses the same mechanism to change the inverse temperature
(``scale``) or switch to hard (arg-max) attention in every attention module, for
ablations through the unchanged training loop (``with override_attention(hard=True):
train(config, workdir)``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxformer.attention.multi_head import MultiHeadAttention

Array = jax.Array

WEIGHTS_NAME = "attention_weights"   # what MultiHeadAttention sows
_UNSET = object()


# --------------------------------------------------------------------------------------
# Interceptors.
# --------------------------------------------------------------------------------------


def _is_attention_call(context: Any) -> bool:
  return (isinstance(context.module, MultiHeadAttention)
          and context.method_name == "__call__")


@contextlib.contextmanager
def capture_attention() -> Iterator[None]:
  """Inside this context every ``MultiHeadAttention`` sows its weights.

  The weights go to 'intermediates' as ``attention_weights`` (``[B, H, Lq, Lk]``
  float32), so ``apply(..., mutable=["intermediates"])`` returns them. Modules that were
  asked for weights anyway behave as usual. Attention runs on the xla path while
  capturing (the only one that materialises weights).
  """

  def interceptor(next_fun, args, kwargs, context):
    if not _is_attention_call(context) or kwargs.get("return_weights"):
      return next_fun(*args, **kwargs)
    out, _ = next_fun(*args, **{**kwargs, "return_weights": True})
    return out

  with nn.intercept_methods(interceptor):
    yield


@contextlib.contextmanager
def override_attention(*, scale: Any = _UNSET, hard: bool | None = None,
                       relative_scale: float | None = None) -> Iterator[None]:
  """Inside this context every ``MultiHeadAttention`` uses the given scale / hardness.

  Traces made inside the context keep the change (so wrap the whole
  ``train(config, workdir)`` call, which traces its steps afresh); a function jitted
  *before* entering is not affected.

  Args:
    scale: inverse temperature beta multiplying ``q . k`` (None = ``1/sqrt(head_dim)``).
    hard: True = arg-max attention (gradients reach the values only), False = softmax.
    relative_scale: beta as a multiple of the default ``1/sqrt(head_dim)`` (exclusive
      with ``scale``).
  Raises:
    ValueError: bad or conflicting arguments.
  """
  if scale is not _UNSET and relative_scale is not None:
    raise ValueError("override_attention: pass scale or relative_scale, not both")
  for name, value in (("scale", scale), ("relative_scale", relative_scale)):
    if value is _UNSET or value is None:
      continue
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
      raise ValueError(f"override_attention: {name}={value!r}; expected a float >= 0")
  if hard is not None and not isinstance(hard, bool):
    raise ValueError(f"override_attention: hard={hard!r}; expected a bool or None")

  def interceptor(next_fun, args, kwargs, context):
    if _is_attention_call(context):
      module = context.module
      # The module instance is created afresh by its parent on every trace, so setting
      # its (frozen) fields here only affects this call.
      if scale is not _UNSET:
        object.__setattr__(module, "scale", None if scale is None else float(scale))
      if relative_scale is not None:
        head_dim = module.head_dim or args[0].shape[-1] // module.num_heads
        object.__setattr__(module, "scale", float(relative_scale) * head_dim ** -0.5)
      if hard is not None:
        object.__setattr__(module, "hard", hard)
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(interceptor):
    yield


# --------------------------------------------------------------------------------------
# Weights per layer.
# --------------------------------------------------------------------------------------


def _flatten(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()
             ) -> Iterator[tuple[tuple[str, ...], Any]]:
  for key, value in tree.items():
    if isinstance(value, Mapping):
      yield from _flatten(value, prefix + (str(key),))
    else:
      yield prefix + (str(key),), value


def collect_weights(intermediates: Mapping[str, Any]) -> dict[str, Array]:
  """``{module path: weights}`` from an 'intermediates' collection.

  Args:
    intermediates: the collection (with or without its ``"intermediates"`` key on top).
  Returns:
    ``{"decoder/layers_0/self_attention": [B, H, Lq, Lk], ...}`` in the order of the
    forward pass. Scanned stacks (weights stacked on a leading layer axis under
    ``layers``) are split into ``layers_0``, ``layers_1``, ...; a module called several
    times gets ``#0``, ``#1``, ... suffixes.
  """
  tree = intermediates.get("intermediates", intermediates)
  out: dict[str, Array] = {}
  for path, value in _flatten(tree):
    if path[-1] != WEIGHTS_NAME:
      continue
    calls = value if isinstance(value, (tuple, list)) else (value,)
    for j, w in enumerate(calls):
      suffix = f"#{j}" if len(calls) > 1 else ""
      if w.ndim == 5 and "layers" in path:  # nn.scan: [num_layers, B, H, Lq, Lk]
        at = path.index("layers")
        for i in range(w.shape[0]):
          name = "/".join(path[:at] + (f"layers_{i}",) + path[at + 1:-1])
          out[name + suffix] = w[i]
      elif w.ndim == 4:
        out["/".join(path[:-1]) + suffix] = w
      else:
        raise ValueError(f"collect_weights: {'/'.join(path)} has shape {w.shape}; "
                         "expected [B, H, Lq, Lk] (or a scanned [layers, B, H, Lq, Lk])")
  return out


def attention_weights(model: nn.Module, variables: Mapping[str, Any], *args: Any,
                      **kwargs: Any) -> dict[str, Array]:
  """Runs ``model.apply(variables, *args, **kwargs)`` and returns every attention map.

  Args:
    model: any Flax model built from ``MultiHeadAttention`` (directly or through
      ``AxialAttention``).
    variables: ``{"params": ...}`` (plus other collections the model needs).
    *args, **kwargs: the model's inputs, e.g. ``tokens_BL`` or ``images_BHWC``.
  Returns:
    ``{module path: float32 [B, H, Lq, Lk]}`` (see :func:`collect_weights`); for axial
    attention ``B`` is the batch times the other axes (see
    :func:`axial_attention_maps`). Rows of allowed queries sum to 1.
  """
  with capture_attention():
    _, state = model.apply(variables, *args, mutable=["intermediates"], **kwargs)
  weights = collect_weights(state.get("intermediates", {}))
  if not weights:
    raise ValueError(f"attention_weights: {type(model).__name__} has no "
                     "MultiHeadAttention that ran on these inputs")
  return weights


def layer_weights(weights: Mapping[str, Array], contains: str = "") -> list[Array]:
  """The maps whose path contains ``contains``, in forward order (e.g. "self_attention")."""
  return [w for name, w in weights.items() if contains in name]


# --------------------------------------------------------------------------------------
# Rollout.
# --------------------------------------------------------------------------------------


def attention_rollout(weights: Sequence[Array], *, add_residual: bool = True) -> Array:
  """Attention rollout (Abnar & Zuidema 2020) through a stack of self-attention layers.

  Per layer the heads are averaged, the identity is added for the residual path
  (``add_residual``) and the rows are renormalised; the layers are multiplied from the
  first to the last: ``R = A_L @ ... @ A_1``.

  Args:
    weights: per layer ``[B, H, L, L]`` (first layer first).
  Returns:
    ``R [B, L, L]`` float32: how much each output token (row) draws on each input token
    (column). Rows sum to 1.
  """
  if not weights:
    raise ValueError("attention_rollout: weights is empty; expected one [B, H, L, L] "
                     "per layer")
  shape = weights[0].shape
  for i, w in enumerate(weights):
    if w.ndim != 4 or w.shape != shape or shape[-1] != shape[-2]:
      raise ValueError(f"attention_rollout: weights[{i}] has shape {w.shape}; expected "
                       f"square self-attention maps of one shape [B, H, L, L] "
                       f"(weights[0]: {shape})")
  batch, _, length, _ = shape
  eye_1LL = jnp.eye(length, dtype=jnp.float32)[None]
  rollout_BLL = jnp.broadcast_to(eye_1LL, (batch, length, length))
  for w_BHLL in weights:
    a_BLL = jnp.mean(w_BHLL.astype(jnp.float32), axis=1)
    if add_residual:
      a_BLL = a_BLL + eye_1LL
    a_BLL = a_BLL / jnp.maximum(jnp.sum(a_BLL, axis=-1, keepdims=True), 1e-12)
    rollout_BLL = jnp.einsum("bij,bjk->bik", a_BLL, rollout_BLL)
  return rollout_BLL


def vit_rollout(model: nn.Module, variables: Mapping[str, Any], images_BHWC: Array,
                *, add_residual: bool = True) -> Array:
  """Rollout of a ViT's encoder onto its patch grid.

  Args:
    model: a ``jaxformer.models.ViT``.
    variables: its variables.
    images_BHWC: images ``[B, H, W, C]`` of the model's size.
    add_residual: see :func:`attention_rollout`.
  Returns:
    ``[B, H / patch, W / patch]`` float32: the [CLS] token's rollout over the patches
    (``pooling="cls"``), or the mean over all tokens' rows (``pooling="mean"``),
    normalised to sum to 1 over the grid.
  """
  cfg = getattr(model, "config", None)
  if cfg is None or not hasattr(cfg, "patch_size"):
    raise TypeError(f"vit_rollout: model must be a ViT (a config with patch_size), got "
                    f"{type(model).__name__}")
  weights = attention_weights(model, variables, images_BHWC)
  rollout_BLL = attention_rollout(layer_weights(weights, "self_attention"),
                                  add_residual=add_residual)
  if cfg.pooling == "cls":
    to_patches_BN = rollout_BLL[:, 0, 1:]
  else:
    to_patches_BN = jnp.mean(rollout_BLL, axis=1)
  to_patches_BN = to_patches_BN / jnp.sum(to_patches_BN, axis=-1, keepdims=True)
  grid = cfg.image_size // cfg.patch_size
  return to_patches_BN.reshape(images_BHWC.shape[0], grid, grid)


# --------------------------------------------------------------------------------------
# Axial attention.
# --------------------------------------------------------------------------------------


def unfold_axial(weights_NHLL: Array, batch: int) -> Array:
  """``[B * R, H, L, L]`` (as ``AxialAttention`` folds it) -> ``[B, R, H, L, L]``.

  ``R`` runs over the other spatial positions in their order: for attention along the
  width of ``[B, H, W, D]`` it is the row index, along the height the column index.
  """
  n = weights_NHLL.shape[0]
  if batch < 1 or n % batch:
    raise ValueError(f"unfold_axial: batch={batch} does not divide the folded batch {n}")
  return weights_NHLL.reshape((batch, n // batch) + weights_NHLL.shape[1:])


def axial_attention_maps(model: nn.Module, variables: Mapping[str, Any], inputs: Array,
                         **kwargs: Any) -> dict[str, Array]:
  """Every axial attention map of ``model`` on ``inputs [B, ...]``, unfolded.

  Returns:
    ``{module path: [B, R, H, L, L]}``: for each position ``r`` of the other axes, the
    heads' weights along the attended axis (see :func:`unfold_axial`). In the axial
    models ``attention_0`` attends along rows (``R`` = row index, ``L`` = width) and
    ``attention_1`` along columns (``R`` = column index, ``L`` = height).
  """
  batch = inputs.shape[0]
  return {name: unfold_axial(w, batch)
          for name, w in attention_weights(model, variables, inputs, **kwargs).items()}


def axial_pixel_map(row_BRHLL: Array, col_BCHLL: Array, query: tuple[int, int]) -> Array:
  """Where pixel ``query = (i, j)`` reads from after row then column attention.

  Ignoring the residual path, attending along rows then along columns gives pixel
  ``(i, j)`` the weight ``col[j][i, k] * row[k][j, l]`` on pixel ``(k, l)``.

  Args:
    row_BRHLL: row attention ``[B, height, heads, width, width]``.
    col_BCHLL: column attention ``[B, width, heads, height, height]``.
    query: the pixel ``(i, j)``.
  Returns:
    ``[B, height, width]`` float32, head-averaged, summing to 1 over the image.
  """
  b, height, _, width, _ = row_BRHLL.shape
  if col_BCHLL.shape[:2] != (b, width) or col_BCHLL.shape[-1] != height:
    raise ValueError(f"axial_pixel_map: row maps {row_BRHLL.shape} and column maps "
                     f"{col_BCHLL.shape} do not describe one [height, width] grid")
  i, j = query
  if not (0 <= i < height and 0 <= j < width):
    raise ValueError(f"axial_pixel_map: query={query} outside the {height}x{width} grid")
  col_BK = jnp.mean(col_BCHLL[:, j, :, i, :].astype(jnp.float32), axis=1)   # over heads
  row_BKL = jnp.mean(row_BRHLL[:, :, :, j, :].astype(jnp.float32), axis=2)
  return col_BK[:, :, None] * row_BKL


def to_numpy(weights: Mapping[str, Array]) -> dict[str, np.ndarray]:
  """Host copies of a ``{name: map}`` dict (for plotting)."""
  return {k: np.asarray(jax.device_get(v)) for k, v in weights.items()}
