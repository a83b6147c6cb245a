"""Models and presets by name, and model configs as plain (JSON-ready) dicts.

The one place the rest of the code base (configs, the CLI, checkpoints) turns a model
name into a config class and a module, and a config into a dict and back:

```python
section = preset_dict("gpt_nano", vocab_size=263, block={"dropout_rate": 0.1})
# {"name": "gpt", "vocab_size": 263, ..., "block": {"num_heads": 4, ...}}
cfg, model = build_model(section)          # GPTConfig, GPT(cfg)
config_from_dict("gpt", config_to_dict(cfg)) == cfg
```
Errors from a dict name the full field path: ``model.block.num_heads=0: expected a
positive int``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxformer.layers.blocks import BlockConfig
from jaxformer.models import axial_transformer as axial
from jaxformer.models import bert, encoder_decoder, gpt, image_gpt, vit

# model name -> (config dataclass, module class)
MODELS: dict[str, tuple[type, type[nn.Module]]] = {
    "gpt": (gpt.GPTConfig, gpt.GPT),
    "bert": (bert.BERTConfig, bert.BERT),
    "encoder_decoder": (encoder_decoder.EncoderDecoderConfig,
                        encoder_decoder.EncoderDecoder),
    "vit": (vit.ViTConfig, vit.ViT),
    "image_gpt": (image_gpt.ImageGPTConfig, image_gpt.ImageGPT),
    "axial_transformer": (axial.AxialTransformerConfig, axial.AxialTransformer),
    "axial_classifier": (axial.AxialTransformerConfig, axial.AxialClassifier),
}

# model name -> (a run's model section -> top-level parameters that run never trained)
UNTRAINED: dict[str, Callable[[Mapping[str, Any]], tuple[str, ...]]] = {
    "bert": bert.untrained_params,
}

# preset name -> (model name, preset function)
PRESETS: dict[str, tuple[str, Callable[..., Any]]] = {
    **{fn.__name__: ("gpt", fn) for fn in (
        gpt.gpt2_small, gpt.gpt2_medium, gpt.gpt2_large, gpt.gpt2_xl, gpt.gpt_nano,
        gpt.gpt_tiny)},
    **{fn.__name__: ("bert", fn) for fn in (
        bert.bert_base, bert.bert_large, bert.bert_tiny, bert.nyu_imdb_classifier)},
    **{fn.__name__: ("encoder_decoder", fn) for fn in (
        encoder_decoder.transformer_base, encoder_decoder.transformer_big,
        encoder_decoder.transformer_tiny)},
    **{fn.__name__: ("vit", fn) for fn in (
        vit.vit_b16, vit.vit_s16, vit.vit_l16, vit.vit_tiny)},
    **{fn.__name__: ("image_gpt", fn) for fn in (
        image_gpt.image_gpt_small, image_gpt.image_gpt_tiny)},
    "axial_cifar10": ("axial_transformer", axial.axial_cifar10),
    "axial_tiny": ("axial_transformer", axial.axial_tiny),
    "axial_classifier_cifar10": ("axial_classifier", axial.axial_cifar10),
    "axial_classifier_tiny": ("axial_classifier", axial.axial_tiny),
}


def _lookup(table: Mapping[str, Any], key: Any, field: str) -> Any:
  if key not in table:
    raise ValueError(f"{field}={key!r} is not known; known: {sorted(table)}")
  return table[key]


def _plain(value: Any) -> Any:
  """ConfigDict / Mapping -> dict (recursively); other values unchanged."""
  if hasattr(value, "to_dict") and not dataclasses.is_dataclass(value):
    value = value.to_dict()
  if isinstance(value, Mapping):
    return {k: _plain(v) for k, v in value.items()}
  return value


def config_to_dict(cfg: Any) -> dict[str, Any]:
  """A model config as a nested plain dict: ``block`` -> dict, dtypes as names
  (``"float32"``), tuples as lists. JSON-serialisable; inverse of
  :func:`config_from_dict`."""
  out = {}
  for field in dataclasses.fields(cfg):
    value = getattr(cfg, field.name)
    if dataclasses.is_dataclass(value):
      value = config_to_dict(value)
    elif isinstance(value, (np.dtype, type)) and field.name in ("dtype", "param_dtype"):
      value = jnp.dtype(value).name
    elif isinstance(value, tuple):
      value = list(value)
    out[field.name] = value
  return out


def _renamed(error: Exception, owner: str, path: str) -> ValueError:
  """``error`` as a ValueError whose ``Owner.field`` mentions read ``path.field``."""
  return ValueError(str(error).replace(f"{owner}.", f"{path}."))


def _check_keys(given: Mapping[str, Any], cls: type, path: str) -> None:
  valid = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(given) - valid)
  if unknown:
    raise ValueError(f"{path}.{unknown[0]}: not a field of {cls.__name__} (unknown: "
                     f"{unknown}); valid fields: {sorted(valid)}")


def config_from_dict(model_name: str, d: Mapping[str, Any], *,
                     prefix: str = "model") -> Any:
  """Rebuilds a model config (with its nested BlockConfig) from a plain dict.

  Args:
    model_name: a key of :data:`MODELS`.
    d: the config's fields, ``block`` a mapping of block fields (fields left out take
      the model's defaults); a ``name`` key equal to ``model_name`` is ignored.
    prefix: the path of ``d`` in the experiment config, used in error messages.
  Raises:
    ValueError: an unknown model, an unknown field or a bad value, naming its full path
      (``model.block.num_heads=0: expected a positive int``).
  """
  cfg_cls, _ = _lookup(MODELS, model_name, f"{prefix}.name")
  fields = _plain(d)
  if fields.get("name", model_name) != model_name:
    raise ValueError(f"{prefix}.name={fields['name']!r} does not match the model "
                     f"{model_name!r}")
  fields.pop("name", None)
  _check_keys(fields, cfg_cls, prefix)
  block = fields.pop("block", None)
  if isinstance(block, BlockConfig):
    fields["block"] = block
  elif block is not None:
    if not isinstance(block, Mapping):
      raise ValueError(f"{prefix}.block={block!r}: expected a mapping of block fields")
    _check_keys(block, BlockConfig, f"{prefix}.block")
    default = next(f for f in dataclasses.fields(cfg_cls) if f.name == "block")
    try:
      fields["block"] = dataclasses.replace(default.default_factory(), **block)
    except (TypeError, ValueError) as e:
      raise _renamed(e, "BlockConfig", f"{prefix}.block") from None
  try:
    return cfg_cls(**fields)
  except (TypeError, ValueError) as e:
    raise _renamed(e, cfg_cls.__name__, prefix) from None


def preset_dict(preset: str, **overrides: Any) -> dict[str, Any]:
  """``{"name": <model name>, **config_to_dict(preset())}`` with ``overrides`` applied.

  Nested overrides are dicts merged into the section: ``preset_dict("gpt_nano",
  vocab_size=263, block={"dropout_rate": 0.1})``. The result is validated (errors name
  ``model.<field>``) and complete, so a command line can override any field of it.
  """
  name, fn = _lookup(PRESETS, preset, "model preset")
  d = config_to_dict(fn())
  for key, value in overrides.items():
    if key == "block" and isinstance(_plain(value), Mapping):
      _check_keys(_plain(value), BlockConfig, "model.block")
      d["block"] = {**d["block"], **_plain(value)}
    else:
      d[key] = value
  return {"name": name, **config_to_dict(config_from_dict(name, d))}


def build_model(section: Mapping[str, Any]) -> tuple[Any, nn.Module]:
  """``(config, module)`` from a model section ``{"name": ..., **fields}``."""
  section = _plain(section)
  name = section.get("name")
  cfg = config_from_dict(name, section)
  return cfg, MODELS[name][1](cfg)


def untrained_params(section: Mapping[str, Any]) -> tuple[str, ...]:
  """Top-level parameters that a run with the model section ``section`` (as stored
  with its checkpoints) never gave a gradient, so that a run starting from it trains
  them as part of its head (:data:`UNTRAINED`; none for most models)."""
  fn = UNTRAINED.get(section["name"] if "name" in section else None)
  return fn(section) if fn else ()


def num_params(cfg: Any, params: Any) -> int:
  """Parameters of the model, not counting vocabulary padding (``vocab_pad_multiple``).

  The count to report and to compare with published sizes (GPT-2 small: 124,439,808);
  ``params`` may hold arrays, boxed arrays or ``jax.ShapeDtypeStruct``s.
  """
  leaves = jax.tree.leaves(nn.meta.unbox(params))
  total = int(sum(int(np.prod(x.shape)) for x in leaves))
  padding = getattr(cfg, "num_padding_params", None)
  return total - (padding() if padding else 0)


def example_inputs(model_name: str, cfg: Any, batch: int = 1) -> tuple[Any, ...]:
  """Zero inputs of the right shapes and dtypes for ``init`` of this model."""
  _lookup(MODELS, model_name, "model.name")
  ids = lambda length: jnp.zeros((batch, length), jnp.int32)  # noqa: E731
  if model_name in ("gpt", "bert"):
    return (ids(min(cfg.max_len, 8)),)
  if model_name == "encoder_decoder":
    return (ids(min(cfg.max_len, 8)), ids(min(cfg.max_len, 8)))
  if model_name == "image_gpt":
    return (ids(cfg.seq_len),)
  if model_name == "vit":
    return (jnp.zeros((batch, cfg.image_size, cfg.image_size, cfg.num_channels)),)
  if model_name == "axial_transformer":
    return (jnp.zeros((batch, *cfg.image_size), jnp.int32),)
  return (jnp.zeros((batch, *cfg.image_size, cfg.num_channels)),)


def logical_axis_sizes(rules: Any, mesh_shape: Mapping[str, int]) -> dict[str, int]:
  """How many ways each logical axis is split: ``rules`` (``jaxformer.axes.rules_for``)
  onto a mesh ``{"data": 2, "fsdp": 1, "tensor": 2}``."""
  out = {}
  for logical, mesh_axes in rules:
    if mesh_axes is None:
      continue
    names = (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)
    out[logical] = int(np.prod([mesh_shape.get(n, 1) for n in names]))
  return out


def _flat(d: Mapping[str, Any], prefix: str) -> dict[str, Any]:
  out = {}
  for key, value in d.items():
    if isinstance(value, Mapping):
      out.update(_flat(value, f"{prefix}.{key}"))
    else:
      out[f"{prefix}.{key}"] = value
  return out


def check_shardable(model_name: str, cfg: Any, axis_sizes: Mapping[str, int], *,
                    prefix: str = "model") -> None:
  """Raises ValueError, naming the config field, when a sharded dimension is indivisible.

  Traces ``init`` (shapes only) and checks every parameter dimension against the
  number of shards of its logical axis (``axis_sizes``, see :func:`logical_axis_sizes`).
  The field is found by value (``model.block.num_heads=6 ...``); a padded vocabulary is
  named with ``vocab_pad_multiple``.
  """
  module = MODELS[model_name][1](cfg)
  shapes = jax.eval_shape(module.init, jax.random.key(0),
                          *example_inputs(model_name, cfg))["params"]
  values = _flat(config_to_dict(cfg), prefix)
  boxed = lambda x: isinstance(x, nn.Partitioned)  # noqa: E731
  for path, leaf in jax.tree_util.tree_leaves_with_path(shapes, is_leaf=boxed):
    if not boxed(leaf):
      continue
    for dim, axis in zip(leaf.value.shape, leaf.names):
      ways = axis_sizes.get(axis, 1) if axis else 1
      if ways <= 1 or dim % ways == 0:
        continue
      fields = [k for k, v in values.items()
                if isinstance(v, int) and not isinstance(v, bool) and v == dim]
      padded = getattr(cfg, "vocab_pad_multiple", 0)
      hint = (f"; {prefix}.vocab_pad_multiple={padded} rounds the vocabulary up, pick a "
              f"multiple of {ways} (None: the training loop picks one for its mesh)"
              ) if padded != 0 and axis == "vocab" else ""
      where = " or ".join(f"{f}={dim}" for f in fields) or f"a dimension of size {dim}"
      raise ValueError(
          f"{where} is not divisible by the {ways}-way sharding of the logical axis "
          f"{axis!r} (parameter {jax.tree_util.keystr(path)}); change it or the mesh "
          f"(sharding.mesh_shape){hint}")
