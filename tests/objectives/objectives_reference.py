"""float64 NumPy references for the objectives' tests."""

from __future__ import annotations

import numpy as np


def log_softmax(logits):
  logits = np.asarray(logits, np.float64)
  shifted = logits - logits.max(axis=-1, keepdims=True)
  return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def cross_entropy(logits, targets, weights=None, label_smoothing=0.0):
  """(mean smoothed CE, mean NLL, accuracy, total weight), float64."""
  logp = log_softmax(logits)
  num_classes = logp.shape[-1]
  onehot = np.eye(num_classes)[np.asarray(targets)]
  q = (1 - label_smoothing) * onehot + label_smoothing / num_classes
  ce = -(q * logp).sum(-1)
  nll = -(onehot * logp).sum(-1)
  w = np.ones(ce.shape) if weights is None else np.asarray(weights, np.float64)
  correct = (np.argmax(logits, -1) == targets).astype(np.float64)
  total = w.sum()
  div = (lambda x: (x * w).sum() / total if total > 0 else 0.0)
  return div(ce), div(nll), div(correct), total
