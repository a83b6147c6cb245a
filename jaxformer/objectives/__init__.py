"""Objectives: each ``loss(...)`` returns ``(loss, metrics)`` with float32 statistics.

``causal_lm``, ``masked_lm`` (+ ``mask_tokens``), ``nsp``,
``seq2seq`` (label smoothing), ``classification``.
"""

from jaxformer.objectives import causal_lm
from jaxformer.objectives import classification
from jaxformer.objectives import masked_lm
from jaxformer.objectives import nsp
from jaxformer.objectives import seq2seq
