"""Attention maps out of any model: weights per layer, ViT rollout, axial maps.

Every jaxformer model config has ``return_weights``: with it on, each
``MultiHeadAttention`` sows its weights into the 'intermediates' collection (and each
``AxialAttention`` its unfolded ``axial_attention_weights``). The functions here run a
copy of the model with ``return_weights=True`` on the same variables, so the maps come
out of a plain forward pass of a model trained without them:

```python
maps = attention_weights(model, variables, tokens_BL)   # {"decoder/layers_0/self_attention":
                                                         #   [B, H, Lq, Lk] float32, ...}
grid_BHW = vit_rollout(model, variables, images_BHWC)   # [CLS] -> patch rollout
maps = axial_attention_maps(model, variables, images_BHWC)  # {"layers_0/attention_0":
                                                         #   [B, R, H, L, L], ...}
```

Ablations of the attention itself (inverse temperature, hard attention) are config
fields of the models: ``attention_scale_multiplier`` and ``attention_hard``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

WEIGHTS_NAME = "attention_weights"        # what MultiHeadAttention sows
AXIAL_WEIGHTS_NAME = "axial_attention_weights"   # what AxialAttention sows


def with_weights(model: nn.Module) -> nn.Module:
  """A copy of ``model`` whose config has ``block.return_weights=True`` (same parameters).

  Raises:
    TypeError: ``model`` has no ``config`` dataclass with a ``block.return_weights``
      field (every jaxformer model has one).
  """
  cfg = getattr(model, "config", None)
  block = getattr(cfg, "block", None)
  if not (dataclasses.is_dataclass(cfg) and dataclasses.is_dataclass(block)
          and "return_weights" in {f.name for f in dataclasses.fields(block)}):
    raise TypeError(f"{type(model).__name__} has no config with a block.return_weights "
                    "field; expected a jaxformer model (GPT, BERT, EncoderDecoder, ViT, "
                    "ImageGPT, AxialClassifier, AxialTransformer). For a bare attention "
                    "module call it with return_weights=True.")
  if block.return_weights:
    return model
  return model.clone(config=dataclasses.replace(
      cfg, block=dataclasses.replace(block, return_weights=True)))


def _intermediates(model: nn.Module, variables: Mapping[str, Any], *args: Any,
                   **kwargs: Any) -> Mapping[str, Any]:
  _, state = with_weights(model).apply(variables, *args, mutable=["intermediates"],
                                       **kwargs)
  return state.get("intermediates", {})


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

  The model runs with ``return_weights=True`` (see :func:`with_weights`), so attention
  takes the xla path (the only one that materialises weights); outputs are unchanged.

  Args:
    model: a jaxformer model (its config has ``return_weights``).
    variables: ``{"params": ...}`` (plus other collections the model needs).
    *args, **kwargs: the model's inputs, e.g. ``tokens_BL`` or ``images_BHWC``.
  Returns:
    ``{module path: float32 [B, H, Lq, Lk]}`` (see :func:`collect_weights`); for axial
    attention ``B`` is the batch times the other axes (see
    :func:`axial_attention_maps`). Rows of allowed queries sum to 1.
  """
  weights = collect_weights(_intermediates(model, variables, *args, **kwargs))
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

  E.g. for the folded maps that :func:`attention_weights` returns for an axial model.

  ``R`` runs over the other spatial positions in their order: for attention along the
  width of ``[B, H, W, D]`` it is the row index, along the height the column index.
  """
  n = weights_NHLL.shape[0]
  if batch < 1 or n % batch:
    raise ValueError(f"unfold_axial: batch={batch} does not divide the folded batch {n}")
  return weights_NHLL.reshape((batch, n // batch) + weights_NHLL.shape[1:])


def axial_attention_maps(model: nn.Module, variables: Mapping[str, Any], inputs: Array,
                         **kwargs: Any) -> dict[str, Array]:
  """Every axial attention map of ``model`` on ``inputs [B, ...]``.

  Reads the ``axial_attention_weights`` that each ``AxialAttention`` sows when the
  model's ``return_weights`` is on.

  Returns:
    ``{module path: [B, R, H, L, L]}``: for each position ``r`` of the other axes, the
    heads' weights along the attended axis. In the axial models ``layers_<l>/attention_0``
    attends along rows (``R`` = row index, ``L`` = width) and ``attention_1`` along
    columns (``R`` = column index, ``L`` = height); the generative model's stacks are
    ``outer_<l>`` and ``inner_<l>``.
  Raises:
    ValueError: the model has no ``AxialAttention``.
  """
  out: dict[str, Array] = {}
  for path, value in _flatten(_intermediates(model, variables, inputs, **kwargs)):
    if path[-1] != AXIAL_WEIGHTS_NAME:
      continue
    calls = value if isinstance(value, (tuple, list)) else (value,)
    for j, w in enumerate(calls):
      out["/".join(path[:-1]) + (f"#{j}" if len(calls) > 1 else "")] = w
  if not out:
    raise ValueError(f"axial_attention_maps: {type(model).__name__} has no "
                     "AxialAttention that ran on these inputs")
  return out


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
