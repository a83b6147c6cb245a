"""``from_huggingface`` / ``to_huggingface`` and the sharded placement of loaded weights.

Loading never builds the whole model on a host: for each of our parameters it reads the
HF tensors it is made of, converts them (one parameter at a time), and places the result
straight into its sharding with ``jax.make_array_from_callback``, each process filling
only its own devices' shards. With several processes every process reads the same
files (a shared file system, as for orbax checkpoints) and keeps one parameter at a time.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from jax.experimental import multihost_utils

from jaxformer.pretrained import checkpoint as ckpt_lib
from jaxformer.pretrained import families
from jaxformer.pretrained import mapping

log = logging.getLogger(__name__)
Path = tuple[str, ...]
Shape = tuple[int, ...]


def spec_of(directory: str) -> families.Spec:
  """The :class:`~jaxformer.pretrained.families.Spec` of a checkpoint directory."""
  return families.read_spec(ckpt_lib.read_config(directory))


def init_inputs(model_name: str, cfg: Any) -> tuple[jax.Array, ...]:
  """Dummy inputs that ``model.init`` sizes every parameter from."""
  if model_name == "vit":
    return (jnp.zeros((1, cfg.image_size, cfg.image_size, cfg.num_channels), jnp.float32),)
  return (jnp.zeros((1, 1), jnp.int32),)


def _layer_rules(rules: Mapping[Path, mapping.Rule], path: Path,
                 num: int) -> list[mapping.Rule] | None:
  """Rules of ``layers_0 .. layers_{num-1}`` for a scanned (stacked) ``layers`` path."""
  if "layers" not in path:
    return None
  i = path.index("layers")
  found = [rules.get(path[:i] + (f"layers_{j}",) + path[i + 1:]) for j in range(num)]
  return None if any(r is None for r in found) else found


class _Reader:
  """Turns rules into our arrays, checking every HF tensor's shape on the way."""

  def __init__(self, ckpt: ckpt_lib.Checkpoint, spec: families.Spec):
    self.ckpt, self.spec, self.used = ckpt, spec, set()

  def available(self, rule: mapping.Rule) -> bool:
    return all(self.ckpt.resolve(n, self.spec.prefix) for n in rule.names)

  def value(self, rule: mapping.Rule, path: Path) -> np.ndarray:
    arrays = []
    for name, want in zip(rule.names, rule.shapes):
      stored = self.ckpt.resolve(name, self.spec.prefix)
      got = self.ckpt.shape(stored)
      if got != want:
        raise ValueError(f"checkpoint parameter {stored!r} has shape {got}, but "
                         f"{'/'.join(path)} needs {want} (from config.json)")
      arrays.append(self.ckpt.get(stored).astype(np.float32, copy=False))
      self.used.add(stored)
    return rule.to_ours(*arrays)


def load_params(directory: str, abstract: Any, *, shardings: Any = None,
                fallback: Any = None, spec: families.Spec | None = None) -> Any:
  """Our parameter tree filled from the checkpoint in ``directory``.

  Args:
    directory: a Hugging Face checkpoint directory.
    abstract: the model's parameters as ``jax.ShapeDtypeStruct`` leaves (unboxed), e.g.
      from ``jax.eval_shape(model.init, ...)``; plain-loop or scanned layers.
    shardings: a matching tree of ``jax.sharding.Sharding`` (None: the default device).
    fallback: a matching tree of arrays for the parameters the checkpoint does not
      have or has in another shape (task heads such as a classifier); None: such
      parameters are an error.
    spec: the checkpoint's spec (default: read from ``config.json``).
  Returns:
    The parameters (a nested dict of ``jax.Array``).
  Raises:
    ValueError: naming the parameter, for unknown checkpoint tensors, shapes that do
      not match, or a body parameter the checkpoint lacks.
  """
  spec = spec or spec_of(directory)
  ckpt = ckpt_lib.Checkpoint(directory)
  rules = mapping.RULES[spec.family](spec)
  reader = _Reader(ckpt, spec)
  flat = traverse_util.flatten_dict(abstract)
  flat_sh = traverse_util.flatten_dict(shardings) if shardings is not None else {}
  flat_fb = traverse_util.flatten_dict(fallback) if fallback is not None else {}
  out, fresh = {}, []
  for path, leaf in flat.items():
    layer_rules = _layer_rules(rules, path, leaf.shape[0] if leaf.shape else 0)
    found = [rules[path]] if path in rules else layer_rules
    optional = path[0] in mapping.OPTIONAL
    if found is None or not all(reader.available(r) for r in found):
      if not optional or path not in flat_fb:
        missing = [n for r in found or () for n in r.names
                   if not ckpt.resolve(n, spec.prefix)]
        raise ValueError(f"parameter {'/'.join(path)} {tuple(leaf.shape)} has no source "
                         f"in {directory!r} ({spec.hf_class}); missing: {missing}")
      out[path] = flat_fb[path]
      fresh.append("/".join(path))
      continue
    if path in rules:
      value = reader.value(rules[path], path)
    else:
      value = np.stack([reader.value(r, path) for r in layer_rules])
    value = _pad_vocab(value, tuple(leaf.shape), rules.get(path))
    if value.shape != tuple(leaf.shape):
      if optional and path in flat_fb:
        out[path] = flat_fb[path]
        fresh.append(f"{'/'.join(path)} (checkpoint {value.shape})")
        continue
      raise ValueError(f"parameter {'/'.join(path)}: the checkpoint gives shape "
                       f"{value.shape}, the model has {tuple(leaf.shape)}")
    out[path] = _place(value.astype(leaf.dtype, copy=False), flat_sh.get(path))
    del value
  _check_leftovers(ckpt, spec, rules, reader.used)
  if fresh:
    log.warning("not in %s, left as initialised: %s", directory, fresh)
  return traverse_util.unflatten_dict(out)


def missing_names(directory: str, abstract: Any,
                  spec: families.Spec | None = None) -> tuple[str, ...]:
  """Top-level names of ``abstract`` (our parameters) that the checkpoint has no
  tensors for (optional heads, e.g. a pooler a checkpoint was saved without): they
  keep their fresh values in :func:`load_params` with a ``fallback``. Reads no
  tensor."""
  spec = spec or spec_of(directory)
  ckpt = ckpt_lib.Checkpoint(directory)
  rules = mapping.RULES[spec.family](spec)
  reader = _Reader(ckpt, spec)
  out = []
  for path, leaf in traverse_util.flatten_dict(abstract).items():
    layer_rules = _layer_rules(rules, path, leaf.shape[0] if leaf.shape else 0)
    found = [rules[path]] if path in rules else layer_rules
    if (path[0] in mapping.OPTIONAL and path[0] not in out
        and (found is None or not all(reader.available(r) for r in found))):
      out.append(path[0])
  return tuple(out)


def _pad_vocab(value: np.ndarray, shape: Shape, rule: mapping.Rule | None) -> np.ndarray:
  """Zero rows up to our padded vocabulary (``vocab_pad_multiple``), else unchanged."""
  axis = rule.vocab_axis if rule is not None else None
  if axis is None or value.ndim != len(shape) or value.shape[axis] >= shape[axis]:
    return value
  if any(v != s for i, (v, s) in enumerate(zip(value.shape, shape)) if i != axis):
    return value
  widths = [(0, shape[i] - value.shape[i] if i == axis else 0) for i in range(value.ndim)]
  return np.pad(value, widths)


def _place(value: np.ndarray, sharding: Any) -> jax.Array:
  if sharding is None:
    return jnp.asarray(value)
  return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


def _check_leftovers(ckpt: ckpt_lib.Checkpoint, spec: families.Spec,
                     rules: Mapping[Path, mapping.Rule], used: set[str]) -> None:
  """Every checkpoint tensor must be used, known to the family, ignorable or dropped."""
  known = {ckpt.resolve(n, spec.prefix) for r in rules.values() for n in r.names}
  dropped = mapping.DROPPED.get(spec.family, {})
  unknown = []
  for name in sorted(ckpt.names - used - known):
    full = name if name in dropped else f"{spec.prefix}.{name}"
    if mapping.ignored(spec.family, name):
      continue
    if name in dropped or full in dropped:
      log.warning("dropping checkpoint parameter %s: %s", name,
                  dropped.get(name, dropped.get(full)))
      continue
    unknown.append(f"{name} {ckpt.shape(name)}")
  if unknown:
    raise ValueError(f"{ckpt.directory!r} ({spec.hf_class}) has parameters jaxformer "
                     f"does not know how to load: {unknown}")


def abstract_variables(model: nn.Module, model_name: str, cfg: Any) -> Any:
  """``jax.eval_shape`` of ``model.init`` (boxed, with logical axis names)."""
  return jax.eval_shape(lambda r: model.init(r, *init_inputs(model_name, cfg)),
                        jax.random.key(0))


def from_huggingface(directory: str, *, sharding: Any = None,
                     overrides: Mapping[str, Any] | None = None,
                     seed: int = 0) -> tuple[nn.Module, Any]:
  """Loads a Hugging Face checkpoint: ``(model, params)``.

  Args:
    directory: ``config.json`` + ``*.safetensors`` as ``save_pretrained`` writes them;
      GPT-2 (GPT2LMHeadModel, GPT2Model), BERT (BertModel, BertForMaskedLM,
      BertForPreTraining, BertForNextSentencePrediction, BertForSequenceClassification),
      DistilBERT (DistilBertModel, DistilBertForMaskedLM), ViT (ViTModel,
      ViTForImageClassification).
    sharding: a :class:`jaxformer.training.sharding.Sharding` (the mesh and its
      logical-axis rules): every parameter is placed in its sharding; None: the
      default device.
    overrides: model fields the weights do not fix (``dropout_rate``, ``dtype``,
      ``scan_layers``, ``remat``, ``attention_impl``, ...), as in a model section.
    seed: initialises what the checkpoint lacks but the model has (BERT's pooler in a
      BertForMaskedLM, which HF does not keep) as HF would (normal(0.02) kernels, zero
      biases); a warning names it.
  Returns:
    ``(model, params)``: the Flax module (its ``config`` is our model config) and
    its ``params`` collection.
  """
  spec = spec_of(directory)
  section = families.model_section(spec, overrides)
  cfg, model = families.build(section)
  if sharding is None:
    abstract, shardings = abstract_variables(model, spec.model, cfg), None
  else:
    with sharding.activate():
      abstract = abstract_variables(model, spec.model, cfg)
    shardings = sharding.logical_shardings(abstract["params"])
  abstract = nn.meta.unbox(abstract["params"])
  fallback = _fallback(directory, spec, abstract, shardings, seed)
  params = load_params(directory, abstract, shardings=shardings, fallback=fallback,
                       spec=spec)
  return model, params


def _fallback(directory: str, spec: families.Spec, abstract: Any, shardings: Any,
              seed: int) -> Any:
  """Fresh values for the optional parameters the checkpoint lacks (None if none).

  Initialised as Hugging Face initialises a missing weight, from numpy (no compile):
  kernels normal(``initializer_range``, 0.02 by default), biases zero, norm scales one.
  """
  ckpt = ckpt_lib.Checkpoint(directory)
  all_rules = mapping.RULES[spec.family](spec)
  flat = traverse_util.flatten_dict(abstract)
  flat_sh = traverse_util.flatten_dict(shardings) if shardings is not None else {}
  std = float(ckpt_lib.read_config(directory).get("initializer_range", 0.02))
  rng = np.random.default_rng(seed)
  out = {}
  for path, leaf in flat.items():
    if path[0] not in mapping.OPTIONAL or (path in all_rules and all(
        ckpt.resolve(n, spec.prefix) for n in all_rules[path].names)):
      continue
    if path[-1] in ("kernel", "embedding"):
      value = rng.normal(0.0, std, leaf.shape)
    else:
      value = np.full(leaf.shape, 1.0 if path[-1] == "scale" else 0.0)
    out[path] = _place(value.astype(leaf.dtype, copy=False), flat_sh.get(path))
  return traverse_util.unflatten_dict(out) if out else None


def _host(x: jax.Array) -> np.ndarray:
  """One parameter on the host, gathered across processes when it spans several."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    x = multihost_utils.process_allgather(x, tiled=True)
  return np.asarray(jax.device_get(x), np.float32)


def to_huggingface(model_config: Any, params: Any, directory: str) -> str:
  """Writes a GPT-2 or BERT model as a Hugging Face checkpoint; returns its class.

  GPT configs become ``GPT2LMHeadModel``; BERT configs ``BertModel``,
  ``BertForMaskedLM``, ``BertForPreTraining``, ``BertForNextSentencePrediction`` or
  ``BertForSequenceClassification`` by their heads. Only process 0 writes; every
  process must call it (sharded parameters are gathered one at a time).
  Raises ValueError naming the field a checkpoint of that family cannot express.
  """
  from jaxformer.layers.blocks import unstack_layer_params  # pylint: disable=g-import-not-at-top
  model_name, hf_class = families.export_class(model_config)
  hf = families.hf_config(model_name, model_config, hf_class)
  spec = families.read_spec(hf)
  rules = mapping.RULES[spec.family](spec)
  params = nn.meta.unbox(params)
  if set(params) == {"params"}:  # the whole variables dict of model.init
    params = params["params"]
  flat = traverse_util.flatten_dict(unstack_layer_params(dict(params)))
  tensors = {}
  for path, leaf in flat.items():
    if path not in rules:
      if path[0] == "pooler" and hf_class in families.NO_POOLER:
        log.warning("%s has no pooler: pooler/%s is not written", hf_class, path[-1])
        continue
      raise ValueError(f"parameter {'/'.join(path)} has no place in a {hf_class} "
                       "checkpoint")
    rule, value = rules[path], _host(leaf)
    if rule.vocab_axis is not None:  # drop the vocabulary padding (HF rows: [V, E])
      value = np.take(value, np.arange(rule.shapes[0][0]), axis=rule.vocab_axis)
    for name, value in zip(rule.names, rule.to_hf(value)):
      tensors[families.export_name(name, spec)] = value
  if jax.process_index() == 0:
    ckpt_lib.write(directory, hf, tensors)
  return hf_class
