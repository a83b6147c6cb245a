"""Fine-tuning: a pretrained body from a training workdir, a fresh head, optional freezing.

A config with a ``finetune`` section turns an ordinary run into fine-tuning::

  finetune.pretrained_workdir = "runs/bert_mlm"   # a workdir written by the loop
  finetune.step = None          # None: its newest checkpoint
  finetune.head = ("classifier",)   # top-level param names that start fresh
  finetune.freeze_body = False  # True: body params get zero updates (set_to_zero)

At step 0 every *body* parameter (everything not under a ``head`` name) is replaced by
the pretrained value at the same path, which must exist with the same shape; only the
``params`` of the pretrained state are read (orbax partial restore: no optimizer state).
Pretrained params the new model does not have (e.g. BERT's MLM and NSP heads) are
ignored. With ``freeze_body`` the optimizer zeroes the body's gradients before ``tx``
and its updates after (:func:`freeze_body`), so the body stays bit-identical to the
checkpoint; gradient clipping then sees only the head's gradients.
Resuming a fine-tuning run restores its own checkpoint, not the pretrained one.

BERT's ``pooler`` (tanh(dense(h[CLS]))) only gets a gradient from NSP or a classifier on
"cls" pooling; after MLM-only pre-training it is still its random init. Loading it as
body (and freezing it) would fit the head on a random frozen projection, so
:func:`resolve` adds ``"pooler"`` to the head (fresh and trainable) whenever the
pretrained run never trained it or does not have it, and says so in the log.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import traverse_util

from jaxformer.training import checkpoint as ckpt_lib

HEAD, BODY = "head", "body"
POOLER = "pooler"


def _check_head(head: Sequence[str]) -> tuple[str, ...]:
  if isinstance(head, str) or not all(isinstance(h, str) for h in head):
    raise TypeError(f"finetune.head={head!r} must be a sequence of top-level "
                    "parameter names, e.g. ('classifier',)")
  return tuple(head)


def _top_name(path: tuple[Any, ...]) -> Any:
  return getattr(path[0], "key", path[0]) if path else None


def param_labels(params: Any, head: Sequence[str]) -> Any:
  """A tree like ``params`` of ``"head"`` (top-level name in ``head``) / ``"body"``."""
  head = _check_head(head)
  return jax.tree_util.tree_map_with_path(
      lambda path, _: HEAD if _top_name(path) in head else BODY, params)


def pretrained_step(workdir: str, step: int | None = None) -> int:
  """The checkpoint step to read in ``workdir`` (newest when ``step`` is None)."""
  checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"),
                                       max_to_keep=None, async_save=False,
                                       read_only=True)
  try:
    steps = checkpointer.all_steps()
  finally:
    checkpointer.close()
  if not steps:
    raise ValueError(f"finetune.pretrained_workdir={workdir!r} has no checkpoint "
                     f"under {os.path.join(workdir, 'checkpoints')}; train the "
                     "pretrained model there first")
  if step is None:
    return max(steps)
  if step not in steps:
    raise ValueError(f"finetune.step={step!r} is not a checkpoint of {workdir!r}; "
                     f"it has {sorted(steps)}")
  return step


def _state_path(workdir: str, step: int | None) -> str:
  step = pretrained_step(workdir, step)
  return os.path.abspath(os.path.join(workdir, "checkpoints", str(step), "state"))


def _params_metadata(checkpointer: Any, path: str) -> Any:
  metadata = checkpointer.metadata(path)
  metadata = getattr(metadata, "item_metadata", metadata)  # StepMetadata (0.12)
  tree = getattr(metadata, "tree", metadata)               # TreeMetadata
  if "params" not in tree:
    raise ValueError(f"checkpoint {path} has no 'params' (it has {sorted(tree)})")
  return tree["params"]


def load_pretrained_params(workdir: str, step: int | None = None, *,
                           target: Any = None) -> dict[str, Any]:
  """The ``params`` of a loop checkpoint (nothing else is read).

  Args:
    workdir: a training workdir (``<workdir>/checkpoints/<step>/state``).
    step: the checkpoint step; None = the newest.
    target: None: every parameter as a host numpy array (one process only). Or a tree,
      a subset of the checkpoint's params, of ``jax.ShapeDtypeStruct`` leaves with
      shardings: only those are read, each straight into its sharding (every process
      reads just its own shards, so no host holds the whole model).
  """
  path = _state_path(workdir, step)
  with ocp.PyTreeCheckpointer() as checkpointer:
    item = {"params": _params_metadata(checkpointer, path) if target is None else target}
    if target is None:
      make_args = lambda _: ocp.RestoreArgs(restore_type=np.ndarray)  # noqa: E731
    else:
      make_args = lambda s: ocp.ArrayRestoreArgs(  # noqa: E731
          sharding=s.sharding, global_shape=s.shape, dtype=s.dtype)
    restored = checkpointer.restore(path, args=ocp.args.PyTreeRestore(
        item=item, restore_args=jax.tree.map(make_args, item), partial_restore=True))
  return restored["params"]


def merge_pretrained(params: Any, pretrained: Any, *, head: Sequence[str]) -> Any:
  """``params`` with every body leaf replaced by ``pretrained``'s leaf at its path.

  Args:
    params: the fine-tuning model's (freshly initialised) parameters.
    pretrained: the pretrained model's parameters (may have more entries).
    head: top-level names of ``params`` kept as initialised.
  Returns:
    The merged tree (body leaves as numpy arrays of the pretrained values, with the
    dtype of ``params``).
  Raises:
    ValueError: a body parameter is missing from ``pretrained`` or has another shape
      (every offending path is named).
  """
  flat_pre = traverse_util.flatten_dict(pretrained)
  merged = traverse_util.flatten_dict(params)
  for path in body_paths(params, pretrained, head=head):
    merged[path] = np.asarray(flat_pre[path], dtype=merged[path].dtype)
  return traverse_util.unflatten_dict(merged)


def body_paths(params: Any, pretrained: Any, *, head: Sequence[str],
               optional: Sequence[str] = ()) -> list[tuple]:
  """The paths of ``params``' body leaves, checked against ``pretrained``.

  Leaves of either tree may be arrays, ``jax.ShapeDtypeStruct`` or orbax metadata
  (anything with a ``shape``). Raises the ValueError described in
  :func:`merge_pretrained`. Names in ``optional`` (added by :func:`resolve`) may be
  absent from ``params``.
  """
  head = _check_head(head)
  shape = lambda x: tuple(getattr(x, "shape", np.shape(x)))  # noqa: E731
  flat = traverse_util.flatten_dict(params)
  flat_pre = traverse_util.flatten_dict(pretrained)
  missing, mismatched, body = [], [], []
  for path, value in flat.items():
    if path[0] in head:
      continue
    name = "/".join(path)
    if path not in flat_pre:
      missing.append(name)
    elif shape(flat_pre[path]) != shape(value):
      mismatched.append(f"{name}: pretrained {shape(flat_pre[path])} != "
                        f"model {shape(value)}")
    else:
      body.append(path)
  if missing or mismatched:
    raise ValueError(
        "the pretrained checkpoint does not match the fine-tuning model's body "
        f"(head={head}):\n  missing: {missing}\n  shape mismatches: {mismatched}\n"
        "Use the pretrained model's sizes in config.model, or list new top-level "
        "parameters in finetune.head.")
  unknown_head = sorted(set(head) - set(optional) - {path[0] for path in flat})
  if unknown_head:
    raise ValueError(f"finetune.head names {unknown_head} that are not top-level "
                     f"parameters of the model; it has {sorted({p[0] for p in flat})}")
  return body


def freeze_body(tx: optax.GradientTransformation,
                head: Sequence[str]) -> optax.GradientTransformation:
  """``tx`` with the body's gradients and updates set to zero.

  ``chain(zero body grads, tx, zero body updates)``: clipping and Adam see the head's
  gradients only (the body's moments stay zero), and decoupled weight decay, which
  ``tx`` adds to every update, is removed from the body's again, so the body's
  parameters never change. (Unlike ``optax.multi_transform`` this keeps ``tx``'s state
  shaped like the params, which the state's sharding derivation relies on.)
  """
  head = _check_head(head)

  def is_body(params):
    return jax.tree.map(lambda label: label == BODY, param_labels(params, head))

  zero_body = optax.masked(optax.set_to_zero(), is_body)
  return optax.chain(zero_body, tx, zero_body)


def wrap_optimizer(tx: optax.GradientTransformation,
                   section: Mapping[str, Any] | None) -> optax.GradientTransformation:
  """``tx``, or :func:`freeze_body` of it when ``section.freeze_body`` is set."""
  if section and section.get("freeze_body", False):
    return freeze_body(tx, section["head"])
  return tx


def init_from_pretrained(state: Any, param_shardings: Any,
                         section: Mapping[str, Any] | None) -> Any:
  """A fresh ``TrainState`` with its body replaced by the pretrained params.

  Does nothing unless ``section.pretrained_workdir`` is set. The body is restored
  straight into ``param_shardings`` (each process reads only its own shards; works
  with any number of processes); the head keeps its fresh values. The optimizer
  state need not change: it was initialised from the shapes only (zero moments).
  """
  if not section or not section.get("pretrained_workdir"):
    return state
  workdir, step = section["pretrained_workdir"], section.get("step")
  with ocp.PyTreeCheckpointer() as checkpointer:
    metadata = _params_metadata(checkpointer, _state_path(workdir, step))
  paths = body_paths(state.params, metadata, head=section["head"],
                     optional=section.get("auto_head", ()))
  flat = traverse_util.flatten_dict(state.params)
  flat_sh = traverse_util.flatten_dict(param_shardings)
  target = traverse_util.unflatten_dict({
      p: jax.ShapeDtypeStruct(flat[p].shape, flat[p].dtype, sharding=flat_sh[p])
      for p in paths})
  flat.update(traverse_util.flatten_dict(
      load_pretrained_params(workdir, step, target=target)))
  return state.replace(params=traverse_util.unflatten_dict(flat))


def pooler_trained(stored_config: Mapping[str, Any] | None) -> bool:
  """Whether a run with this stored config gave BERT's ``pooler`` a gradient.

  Only the NSP head or a classifier on "cls" pooling reads the pooler; MLM alone never
  does, and other poolings have no pooler at all.
  """
  model = (stored_config or {}).get("model") or {}
  if model.get("pooling", "cls") != "cls":
    return False
  return bool(model.get("nsp_head")) or bool(model.get("num_classes"))


def stored_config(workdir: str, step: int) -> dict[str, Any]:
  """The config saved with checkpoint ``step`` of the run in ``workdir`` (read-only:
  another run's in-flight saves and temp directories are left alone)."""
  checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"),
                                       max_to_keep=None, async_save=False,
                                       read_only=True)
  try:
    return checkpointer.stored_config(step)
  finally:
    checkpointer.close()


def resolve(section: Mapping[str, Any] | None) -> dict[str, Any] | None:
  """``section`` with ``"pooler"`` added to ``head`` when the pretrained run never
  trained it (:func:`pooler_trained` of its stored config) or has no pooler params.

  The added names are listed under ``auto_head`` (they may be absent from the
  fine-tuning model, e.g. with ``pooling="max"``). Without ``pretrained_workdir`` the
  section is returned as a plain dict, unchanged.
  """
  if not section:
    return None
  section = dict(section)
  section["head"] = _check_head(section.get("head", ()))
  if not section.get("pretrained_workdir") or POOLER in section["head"]:
    return section
  workdir = section["pretrained_workdir"]
  step = pretrained_step(workdir, section.get("step"))
  stored = stored_config(workdir, step)
  with ocp.PyTreeCheckpointer() as reader:
    has_pooler = POOLER in _params_metadata(reader, _state_path(workdir, step))
  if not has_pooler or not pooler_trained(stored):
    section["head"] += (POOLER,)
    section["auto_head"] = (POOLER,)
  return section


def trainable(params: Any, section: Mapping[str, Any] | None) -> list[str]:
  """The top-level names of ``params`` that the optimizer updates."""
  names = sorted({_top_name(path) for path, _ in
                  jax.tree_util.tree_flatten_with_path(params)[0]})
  if not section or not section.get("freeze_body"):
    return names
  return [n for n in names if n in tuple(section["head"])]


def describe(section: Mapping[str, Any] | None, params: Any = None) -> str:
  """One log line about the fine-tuning setup ("" when there is none); with
  ``params``, also the trainable top-level names and their parameter count."""
  if not section or not section.get("pretrained_workdir"):
    return ""
  line = (f"fine-tuning: body from {section['pretrained_workdir']} (step "
          f"{section.get('step') or 'newest'}), fresh head "
          f"{tuple(section['head'])}, body "
          f"{'frozen' if section.get('freeze_body') else 'trained'}")
  if section.get("auto_head"):
    line += (f" ({', '.join(section['auto_head'])} added to the head: the pretrained "
             "run never trained it)")
  if params is not None:
    names = trainable(params, section)
    count = sum(int(np.prod(np.shape(x))) for n in names
                for x in jax.tree.leaves(params[n]))
    line += f" | trainable: {', '.join(names)} ({count:,} params)"
  return line
