"""Where a run's parameters start: scratch, a Hugging Face directory, or one of our runs.

The config chooses the origin once (:class:`InitConfig`, parsed from ``init`` and
``finetune``)::

  init.pretrained = "path/to/hf_checkpoint"      # a Hugging Face checkpoint directory
  finetune.pretrained_workdir = "runs/pretrain"  # or a workdir written by the loop
  finetune.step = None           # its checkpoint (None: the newest)
  finetune.head = ("classifier",)    # top-level params that start fresh
  finetune.freeze_body = False   # True: only the head trains

and every origin answers the same four questions (:class:`Origin`):

* ``configure(model)``: the model section (a Hugging Face checkpoint brings its
  architecture; the others keep the config's);
* ``tokenizer(data)``: the tokenizer it brings (None: the data section's);
* ``load(state, param_shardings)``: the fresh, sharded state with its parameters
  replaced by the origin's (each process reads only its own shards);
* ``head(abstract_params)`` / ``trains(params)``: what trains. The head is
  ``finetune.head`` plus every parameter the origin leaves untrained: what a Hugging
  Face checkpoint lacks and what the pretrained run never gave a gradient (the model
  says which: :func:`jaxformer.models.registry.untrained_params`). With
  ``freeze_body`` everything else gets zero updates (:func:`freeze_body`), so a frozen
  body never freezes a random layer.

The config edge picks the origin (:func:`jaxformer.training.config.make_origin`); the
loop uses it at the start of a run. Resuming restores the run's own checkpoint, never
the origin's.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
import optax

from jaxformer import configs

HEAD, BODY = "head", "body"
ORIGINS = ("scratch", "huggingface", "run")


@dataclasses.dataclass(frozen=True, kw_only=True)
class InitConfig:
  """The origin of a run's parameters (see the module docstring).

  Attributes:
    origin: ``"scratch"``, ``"huggingface"`` (``init.pretrained``) or ``"run"``
      (``finetune.pretrained_workdir``).
    path: the Hugging Face directory or the workdir (None from scratch).
    step: the run's checkpoint (None: the newest).
    head: top-level parameter names that start fresh (never loaded).
    freeze_body: only the head (plus what the origin leaves untrained) trains.
  """

  origin: str = "scratch"
  path: str | None = None
  step: int | None = None
  head: tuple[str, ...] = ()
  freeze_body: bool = False

  def __post_init__(self):
    if self.origin not in ORIGINS:
      raise ValueError(f"init origin {self.origin!r} is not one of {ORIGINS}")
    if (self.origin == "scratch") != (self.path is None):
      raise ValueError(f"init origin {self.origin!r} with path={self.path!r}")

  @classmethod
  def parse(cls, init: Any, finetune: Any) -> InitConfig:
    """From the ``init`` section (``pretrained``) and the ``finetune`` section
    (``pretrained_workdir``, ``step``, ``head``, ``freeze_body``)."""
    hf = configs.parse(InitSection, init, "init")
    run = configs.parse(FinetuneSection, finetune, "finetune")
    if hf.pretrained and run.pretrained_workdir:
      raise ValueError(
          f"init.pretrained={hf.pretrained!r} and finetune.pretrained_workdir="
          f"{run.pretrained_workdir!r} are two origins; set one")
    origin, path = (("huggingface", hf.pretrained) if hf.pretrained else
                    ("run", run.pretrained_workdir) if run.pretrained_workdir else
                    ("scratch", None))
    return cls(origin=origin, path=path, step=run.step, head=run.head,
               freeze_body=run.freeze_body)


@dataclasses.dataclass(frozen=True, kw_only=True)
class InitSection:
  """The ``init`` section: ``pretrained``, a Hugging Face checkpoint directory."""
  pretrained: str | None = None


@dataclasses.dataclass(frozen=True, kw_only=True)
class FinetuneSection:
  """The ``finetune`` section (see the module docstring)."""
  pretrained_workdir: str | None = None
  step: int | None = None
  head: tuple[str, ...] = ()
  freeze_body: bool = False


def _check_head(head: Sequence[str]) -> tuple[str, ...]:
  if isinstance(head, str) or not all(isinstance(h, str) for h in head):
    raise TypeError(f"finetune.head={head!r} must be a sequence of top-level "
                    "parameter names, e.g. ('classifier',)")
  return tuple(head)


def _top_name(path: tuple[Any, ...]) -> Any:
  return getattr(path[0], "key", path[0]) if path else None


def top_names(params: Any) -> list[str]:
  """The sorted top-level names of a parameter tree."""
  return sorted({_top_name(path) for path, _ in
                 jax.tree_util.tree_flatten_with_path(params)[0]})


def param_labels(params: Any, head: Sequence[str]) -> Any:
  """A tree like ``params`` of ``"head"`` (top-level name in ``head``) / ``"body"``."""
  head = _check_head(head)
  return jax.tree_util.tree_map_with_path(
      lambda path, _: HEAD if _top_name(path) in head else BODY, params)


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


class Origin:
  """From scratch; the base of every origin (see the module docstring).

  Subclasses override :meth:`configure`, :meth:`tokenizer`, :meth:`untrained`,
  :meth:`load` and :meth:`where`.
  """

  def __init__(self, config: InitConfig):
    self.config = config
    self._head: tuple[str, ...] | None = None
    self._added: tuple[str, ...] = ()

  # --- what each origin says ----------------------------------------------------------

  def configure(self, model: Mapping[str, Any]) -> dict[str, Any]:
    """The run's model section, as plain dicts (the config's, unless the origin brings
    its own)."""
    return configs.plain(model)

  def tokenizer(self, data: Any) -> Any:
    """The tokenizer the origin brings (None: ``data.tokenizer``'s)."""
    del data
    return None

  def untrained(self, abstract_params: Any) -> tuple[str, ...]:
    """Top-level names the origin leaves untrained (they join the head)."""
    del abstract_params
    return ()

  def load(self, state: Any, param_shardings: Any) -> Any:
    """``state`` (fresh, sharded) with its parameters replaced by the origin's."""
    del param_shardings
    return state

  def where(self) -> str:
    """Where the parameters come from, for the log."""
    return "scratch"

  # --- shared -------------------------------------------------------------------------

  def head(self, abstract_params: Any) -> tuple[str, ...]:
    """``finetune.head`` plus what the origin leaves untrained (computed once)."""
    if self._head is None:
      head = _check_head(self.config.head)
      self._added = tuple(n for n in self.untrained(abstract_params) if n not in head)
      self._head = head + self._added
    return self._head

  def optimizer(self, tx: optax.GradientTransformation,
                abstract_params: Any) -> optax.GradientTransformation:
    """``tx``, with the body frozen when ``freeze_body`` is set."""
    if self.config.freeze_body:
      return freeze_body(tx, self.head(abstract_params))
    return tx

  def trains(self, params: Any) -> list[str]:
    """The top-level names of ``params`` that the optimizer updates."""
    names = top_names(params)
    if not self.config.freeze_body:
      return names
    return [n for n in names if n in self.head(params)]

  def describe(self, params: Any) -> str:
    """One log line: where the parameters come from and what trains (the names and
    their parameter count)."""
    cfg = self.config
    line = f"init: {self.where()}"
    if cfg.origin != "scratch" or cfg.freeze_body:
      line += (f", fresh head {self.head(params)}, body "
               f"{'frozen' if cfg.freeze_body else 'trained'}")
    if self._added:
      line += (f" ({', '.join(self._added)} added to the head: the origin never "
               "trained it)")
    names = self.trains(params)
    count = sum(int(np.prod(np.shape(x))) for n in names
                for x in jax.tree.leaves(params[n]))
    return line + f" | trainable: {', '.join(names)} ({count:,} params)"
