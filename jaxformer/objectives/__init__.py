"""Objectives: each ``loss(...)`` returns ``(loss, metrics)`` with float32 statistics.

``causal_lm``, ``masked_lm`` (+ ``mask_tokens``), ``nsp``,
``seq2seq`` (label smoothing), ``classification``.

Why apart from :mod:`jaxformer.tasks`: an objective is a pure function of arrays
(logits, targets, weights -> loss), with no data, config or model, checked against a
float64 reference on its own (``tests/objectives``) and usable outside the loop (a
notebook scoring a model). A task is the wiring around it: its data, its model inputs,
which objectives it sums (masked LM + NSP) and its evals.
"""

from jaxformer.objectives import causal_lm
from jaxformer.objectives import classification
from jaxformer.objectives import masked_lm
from jaxformer.objectives import nsp
from jaxformer.objectives import seq2seq
