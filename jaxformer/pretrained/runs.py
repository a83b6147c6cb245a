"""``config.init.pretrained=DIR``: a training run that starts from a Hugging Face checkpoint.

:func:`configure` rewrites a run's config before anything is built: the model section
takes the checkpoint's architecture (sizes, activation, norms, epsilons, tables) and
keeps what the task chooses (heads such as ``num_classes``, dropout, dtypes, remat,
attention implementation); the tokenizer becomes the checkpoint's
(``data.tokenizer="pretrained"``) when the directory has vocabulary files.
:func:`load_into_state` then replaces the freshly created parameters, in their
shardings, by the checkpoint's: the whole body, and each head whose shape matches
(a classifier with another number of labels stays fresh).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping
from typing import Any

import jax

from jaxformer.pretrained import families
from jaxformer.pretrained import loading
from jaxformer.pretrained import tokenizers

log = logging.getLogger(__name__)
TOKENIZER = "pretrained"


def directory(config: Mapping[str, Any]) -> str | None:
  """``config.init.pretrained`` (None when unset or when there is no ``init``)."""
  init = config.get("init") if hasattr(config, "get") else None
  return (init or {}).get("pretrained") or None


def configure(config: Any) -> Any:
  """A copy of ``config`` set up for ``init.pretrained`` (``config`` itself if unset)."""
  path = directory(config)
  if not path:
    return config
  spec = loading.spec_of(path)
  section = families.model_section(spec, config["model"], with_heads=False)
  new = copy.deepcopy(config)
  unlocked = getattr(new, "unlocked", None)
  with unlocked() if unlocked else _nothing():
    new["model"] = type(config["model"])(section) if hasattr(
        config["model"], "to_dict") else section
    if tokenizers.has_tokenizer(path) and new["data"].get("tokenizer") is not None:
      new["data"]["tokenizer"] = TOKENIZER
  log.warning("init.pretrained=%s: %s (%s), tokenizer %s", path, spec.hf_class,
              spec.family, new["data"].get("tokenizer"))
  return new


class _nothing:  # pylint: disable=invalid-name
  def __enter__(self):
    return self

  def __exit__(self, *exc):
    return False


def tokenizer(config: Mapping[str, Any]) -> tokenizers.HuggingFaceTokenizer | None:
  """The checkpoint's tokenizer when :func:`configure` chose it, else None."""
  path = directory(config)
  if path and config["data"].get("tokenizer") == TOKENIZER:
    return tokenizers.load_tokenizer(path)
  return None


def load_into_state(state: Any, param_shardings: Any, config: Mapping[str, Any]) -> Any:
  """``state`` with its parameters loaded from ``init.pretrained`` (unchanged if unset).

  Each parameter is read, converted and placed into its sharding on its own (see
  :func:`jaxformer.pretrained.load_params`), on every process; parameters the
  checkpoint lacks or has in another shape keep their fresh values if they are heads.
  """
  path = directory(config)
  if not path:
    return state
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state.params)
  params = loading.load_params(path, abstract, shardings=param_shardings,
                               fallback=state.params)
  return state.replace(params=params)
