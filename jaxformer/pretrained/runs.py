"""``config.init.pretrained=DIR``: a training run that starts from a Hugging Face checkpoint.

:class:`HuggingFaceOrigin` is the ``"huggingface"`` origin of
:mod:`jaxformer.training.init`:

* ``configure``: the model section takes the checkpoint's architecture (sizes,
  activation, norms, epsilons, tables) and keeps what the task chooses (heads such as
  ``num_classes``, dropout, dtypes, remat, attention implementation);
* ``tokenizer``: the checkpoint's, when the directory has vocabulary files and the data
  are text (``data.tokenizer`` set);
* ``load``: the freshly created parameters, in their shardings, are replaced by the
  checkpoint's: the whole body, and each head whose shape matches (a classifier with
  another number of labels stays fresh);
* ``untrained``: what the checkpoint has no tensors for (e.g. a pooler it was saved
  without) joins the head, so ``finetune.freeze_body`` never freezes a random layer.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import jax

from jaxformer.pretrained import families
from jaxformer.pretrained import loading
from jaxformer.pretrained import tokenizers
from jaxformer.training import init as init_lib

log = logging.getLogger(__name__)


class HuggingFaceOrigin(init_lib.Origin):
  """Parameters (and tokenizer) from a Hugging Face checkpoint directory."""

  def __init__(self, config: init_lib.InitConfig):
    super().__init__(config)
    self.spec = loading.spec_of(config.path)

  def configure(self, model: Mapping[str, Any]) -> dict[str, Any]:
    section = families.model_section(self.spec, model, with_heads=False)
    log.warning("init.pretrained=%s: %s (%s)", self.config.path, self.spec.hf_class,
                self.spec.family)
    return section

  def tokenizer(self, data: Any) -> tokenizers.HuggingFaceTokenizer | None:
    if data.tokenizer is None or not tokenizers.has_tokenizer(self.config.path):
      return None
    return tokenizers.load_tokenizer(self.config.path)

  def untrained(self, abstract_params: Any) -> tuple[str, ...]:
    return loading.missing_names(self.config.path, _shapes(abstract_params), self.spec)

  def load(self, state: Any, param_shardings: Any) -> Any:
    """Each parameter is read, converted and placed into its sharding on its own (see
    :func:`jaxformer.pretrained.load_params`), on every process; parameters the
    checkpoint lacks or has in another shape keep their fresh values if they are
    heads."""
    params = loading.load_params(self.config.path, _shapes(state.params),
                                 shardings=param_shardings, fallback=state.params,
                                 spec=self.spec)
    return state.replace(params=params)

  def where(self) -> str:
    return f"{self.config.path} ({self.spec.hf_class})"


def _shapes(tree: Any) -> Any:
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)
