"""The layer stack: ``num_layers`` blocks of one kind, optionally rematerialised / scanned.

Also converts parameters between the plain-loop layout (``layers_i``) and the scanned one
(one ``layers`` with a leading ``LAYERS`` axis).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxformer import axes

Array = jax.Array


class Stack(nn.Module):
  """``num_layers`` blocks of one kind, optionally rematerialised and/or scanned.

  ``__call__(x, *block_args, deterministic=False|True)``: ``block_args`` are the block's
  positional arguments after ``x`` (e.g. ``mask, segment_ids, positions`` for
  ``EncoderBlock``), the same for every layer.

  Params: plain loop ``layers_0 .. layers_{n-1}``; ``scan=True`` -> one ``layers`` whose
  leaves are stacked along a leading ``LAYERS`` axis (convert with
  :func:`stack_layer_params` / :func:`unstack_layer_params`). ``final_norm`` (default: on
  for pre-LN) adds ``final_norm`` after the last block. Under ``scan`` the 'cache' and
  'intermediates' collections are stacked along the layer axis too.

  Attributes:
    block: ``EncoderBlock`` or ``DecoderBlock``.
    config: the blocks' config.
    num_layers: depth.
    remat: ``nn.remat`` each block (recompute activations in the backward pass).
    scan: ``nn.scan`` over layers (one traced block; faster compiles for deep stacks).
    block_kwargs: extra block attributes, e.g. ``{"cross_attention": True}``.
    final_norm: None -> ``config.norm == "pre"``.
  """
  block: Any
  config: Any  # jaxformer.layers.blocks.BlockConfig
  num_layers: int
  remat: bool = False
  scan: bool = False
  block_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  final_norm: bool | None = None

  @nn.compact
  def __call__(self, x_BLD: Array, *block_args: Any, deterministic: bool = True) -> Array:
    if not isinstance(self.num_layers, int) or self.num_layers < 0:
      raise ValueError(f"Stack.num_layers={self.num_layers!r}; expected an int >= 0")
    block_cls = self.block
    args = (*block_args, deterministic)
    if self.remat:
      # static_argnums counts `self` as 0 and x as 1, so deterministic (the last of
      # `args`) is at 1 + len(args).
      block_cls = nn.remat(block_cls, prevent_cse=not self.scan,
                           static_argnums=(1 + len(args),))
    if self.scan and self.num_layers > 0:
      def body(module, carry, *xs):
        return module(carry, *xs), None

      scanned = nn.scan(
          body,
          variable_axes={"params": 0, "cache": 0, "intermediates": 0},
          split_rngs={"params": True, "dropout": True},
          in_axes=nn.broadcast,
          length=self.num_layers,
          metadata_params={nn.PARTITION_NAME: axes.LAYERS})
      layer = block_cls(self.config, name="layers", **self.block_kwargs)
      x_BLD, _ = scanned(layer, x_BLD, *args)
    else:
      for i in range(self.num_layers):
        x_BLD = block_cls(self.config, name=f"layers_{i}", **self.block_kwargs)(
            x_BLD, *args)
    use_final = self.config.norm == "pre" if self.final_norm is None else self.final_norm
    if use_final:
      x_BLD = self.config.make_norm("final_norm")(x_BLD)
    return x_BLD


_LAYER_KEY = re.compile(r"^layers_(\d+)$")


def _is_box(x: Any) -> bool:
  return isinstance(x, nn.Partitioned)


def _stack_leaves(*xs: Any) -> Any:
  if _is_box(xs[0]):  # keep logical names: prepend the LAYERS axis
    return xs[0].replace(value=jnp.stack([x.value for x in xs]),
                         names=(axes.LAYERS, *xs[0].names))
  return jnp.stack(xs)


def _index_leaf(x: Any, i: int) -> Any:
  if _is_box(x):
    return x.replace(value=x.value[i], names=tuple(x.names[1:]))
  return x[i]


def stack_layer_params(tree: Any) -> Any:
  """Plain-loop variables -> scanned layout (``layers_i`` dicts -> one stacked ``layers``).

  Works on any nested dict, e.g. a whole ``variables`` tree (boxed ``nn.Partitioned``
  leaves get the ``layers`` axis name prepended); every dict holding
  ``layers_0 .. layers_{n-1}`` is rewritten, other keys are kept.
  """
  if not isinstance(tree, Mapping):
    return tree
  out = {}
  layer_items = {}
  for key, value in tree.items():
    m = _LAYER_KEY.match(str(key))
    if m:
      layer_items[int(m.group(1))] = stack_layer_params(value)
    else:
      out[key] = stack_layer_params(value)
  if layer_items:
    if sorted(layer_items) != list(range(len(layer_items))):
      raise ValueError(f"layer keys are not contiguous: {sorted(layer_items)}")
    out["layers"] = jax.tree.map(_stack_leaves,
                                 *[layer_items[i] for i in range(len(layer_items))],
                                 is_leaf=_is_box)
  return out


def unstack_layer_params(tree: Any) -> Any:
  """Scanned variables -> plain-loop layout (inverse of :func:`stack_layer_params`)."""
  if not isinstance(tree, Mapping):
    return tree
  out = {}
  for key, value in tree.items():
    if key == "layers" and isinstance(value, Mapping):
      n = jax.tree.leaves(value)[0].shape[0]
      inner = unstack_layer_params(value)
      for i in range(n):
        out[f"layers_{i}"] = jax.tree.map(lambda x, i=i: _index_leaf(x, i), inner,
                                          is_leaf=_is_box)
    else:
      out[key] = unstack_layer_params(value)
  return out
