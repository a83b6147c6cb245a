"""A finished (or running) training run, read back: model, params and tokenizer.

:func:`load_run` rebuilds what ``experiments/train.py`` trained in a workdir from the
config stored with its checkpoint (not from a config file, which may have changed since)
and restores that checkpoint's ``params`` read-only (no optimizer state, nothing is
written, the run may still be training). The tokenizer is the run's own: bytes, the
vocabulary fitted into ``<workdir>/tokenizer/``, or the Hugging Face one of
``init.pretrained``. Sampling, perplexity or prompting commands share it.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

from flax import linen as nn

from jaxformer.data import tokenizers as tok_lib
from jaxformer.data import vocab
from jaxformer.pretrained import tokenizers as hf_tokenizers
from jaxformer.training import checkpoint as ckpt_lib
from jaxformer.training import finetune
from jaxformer.training import init as init_lib
from jaxformer.training import loop


@dataclasses.dataclass(frozen=True)
class SavedRun:
  """A run read back: its stored ``config`` (plain dicts), the rebuilt ``model`` and
  ``model_config``, the checkpoint's ``params`` (host numpy arrays), the ``tokenizer``
  and the checkpoint ``step``."""
  config: dict[str, Any]
  model: nn.Module
  model_config: Any
  params: Any
  tokenizer: tok_lib.Tokenizer | None
  step: int


def run_tokenizer(config: dict[str, Any], workdir: str) -> tok_lib.Tokenizer | None:
  """The tokenizer the run in ``workdir`` trained with (never fits a new one): the
  Hugging Face checkpoint's when the run started from one, else ``data.tokenizer``'s.

  ``config`` is the stored config (JSON data, the edge: read as such)."""
  data = config.get("data") or {}
  kind = data.get("tokenizer")
  init = init_lib.InitConfig.parse(config.get("init"), config.get("finetune"))
  if (init.origin == "huggingface" and kind is not None
      and hf_tokenizers.has_tokenizer(init.path)):
    return hf_tokenizers.load_tokenizer(init.path)
  if kind in vocab.FILES:
    path = os.path.join(workdir, "tokenizer", vocab.FILES[kind])
    if not os.path.exists(path):
      raise ValueError(f"{workdir!r} trained with data.tokenizer={kind!r} but has no "
                       f"fitted vocabulary at {path}")
    return vocab.load(kind, path)
  return vocab.build_tokenizer(data)


def _step(workdir: str, step: int | None) -> int:
  """The checkpoint ``step`` to read (newest if None); ValueError naming ``workdir``."""
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ValueError(f"--workdir={workdir!r} is a file, not a training run's directory")
  directory = os.path.join(workdir, "checkpoints")
  steps = ckpt_lib.Checkpointer(directory, max_to_keep=None, async_save=False,
                                read_only=True)
  try:
    found = sorted(steps.all_steps())
  finally:
    steps.close()
  if not found:
    raise ValueError(f"--workdir={workdir!r} has no checkpoint under {directory}: "
                     "give the workdir of a training run (experiments.train)")
  if step is None:
    return found[-1]
  if step not in found:
    raise ValueError(f"--step={step} is not a checkpoint of {workdir!r}; it has {found}")
  return step


def _damaged(workdir: str, step: int, error: Exception) -> ValueError:
  where = os.path.join(workdir, "checkpoints", str(step))
  reason = " ".join(f"{type(error).__name__}: {error}".split())[:300]
  return ValueError(f"checkpoint {where} is damaged and does not restore ({reason}); "
                    "give another --step, or train again")


def load_run(workdir: str, step: int | None = None, *,
             check: Callable[[dict[str, Any]], None] | None = None) -> SavedRun:
  """The model, params and tokenizer of the checkpoint ``step`` (newest if None) of
  the training run in ``workdir``. ``check(stored config)``, when given, may refuse
  the run (raising) before anything is built or restored.

  Raises:
    ValueError: ``workdir`` has no checkpoint (or not ``step``), the checkpoint is
      damaged, or the run lacks its fitted vocabulary.
  """
  step = _step(workdir, step)
  try:
    config = finetune.stored_config(workdir, step)
  except Exception as e:  # pylint: disable=broad-except
    raise _damaged(workdir, step, e) from e
  if not config.get("model"):
    raise ValueError(f"checkpoint {step} of {workdir!r} stores no model config")
  if check is not None:
    check(config)
  tokenizer = run_tokenizer(config, workdir)
  model_config, model = loop.build_model(config, tokenizer)
  try:
    params = finetune.load_pretrained_params(workdir, step)
  except Exception as e:  # pylint: disable=broad-except
    raise _damaged(workdir, step, e) from e
  return SavedRun(config=config, model=model, model_config=model_config,
                  params=params, tokenizer=tokenizer, step=step)
