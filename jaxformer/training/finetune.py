"""Starting from one of our runs: its body, a fresh head, optional freezing.

A config with ``finetune.pretrained_workdir`` (a workdir written by the loop) starts
from that run's checkpoint (``finetune.step``, None: the newest): :class:`RunOrigin`,
the ``"run"`` origin of :mod:`jaxformer.training.init`.

At step 0 every *body* parameter (everything not under a ``head`` name) is replaced by
the pretrained value at the same path, which must exist with the same shape; only the
``params`` of the pretrained state are read (orbax partial restore: no optimizer state).
Pretrained params the new model does not have (e.g. pre-training heads) are
ignored. The head gains the parameters the pretrained run never trained (its stored
model section says which: :func:`jaxformer.models.registry.untrained_params`), so a
frozen body never freezes a random layer. Resuming a fine-tuning run restores its own
checkpoint, not the pretrained one.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import traverse_util

from jaxformer.models import registry
from jaxformer.training import checkpoint as ckpt_lib
from jaxformer.training import init as init_lib
from jaxformer.training.init import freeze_body  # noqa: F401 (re-exported)
from jaxformer.training.init import param_labels  # noqa: F401 (re-exported)

_check_head = init_lib._check_head  # pylint: disable=protected-access


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


def init_from_pretrained(state: Any, param_shardings: Any, workdir: str,
                         step: int | None, head: Sequence[str],
                         optional: Sequence[str] = ()) -> Any:
  """A fresh ``TrainState`` with its body replaced by the params of a loop checkpoint.

  The body (every parameter not under a ``head`` name; ``optional`` head names may be
  absent from the model) is restored straight into ``param_shardings`` (each process
  reads only its own shards; works with any number of processes); the head keeps its
  fresh values. The optimizer state need not change: it was initialised from the
  shapes only (zero moments).
  """
  with ocp.PyTreeCheckpointer() as checkpointer:
    metadata = _params_metadata(checkpointer, _state_path(workdir, step))
  paths = body_paths(state.params, metadata, head=head, optional=optional)
  flat = traverse_util.flatten_dict(state.params)
  flat_sh = traverse_util.flatten_dict(param_shardings)
  target = traverse_util.unflatten_dict({
      p: jax.ShapeDtypeStruct(flat[p].shape, flat[p].dtype, sharding=flat_sh[p])
      for p in paths})
  flat.update(traverse_util.flatten_dict(
      load_pretrained_params(workdir, step, target=target)))
  return state.replace(params=traverse_util.unflatten_dict(flat))


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


class RunOrigin(init_lib.Origin):
  """The ``"run"`` origin: the body of a loop checkpoint (the module docstring)."""

  def __init__(self, config: init_lib.InitConfig):
    super().__init__(config)
    self._step = pretrained_step(config.path, config.step)

  def untrained(self, abstract_params: Any) -> tuple[str, ...]:
    """What the pretrained run never trained (its stored model section says)."""
    del abstract_params
    stored = stored_config(self.config.path, self._step)
    return registry.untrained_params(stored["model"]) if stored.get("model") else ()

  def load(self, state: Any, param_shardings: Any) -> Any:
    return init_from_pretrained(state, param_shardings, self.config.path, self._step,
                                self.head(state.params), optional=self._added)

  def where(self) -> str:
    return f"{self.config.path} (step {self._step})"
