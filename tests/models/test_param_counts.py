"""Published parameter counts, from shapes only (jax.eval_shape: no memory, no compute)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import parameterized

from jaxformer import models


def _count(module, *inputs) -> int:
  shapes = jax.eval_shape(module.init, jax.random.key(0), *inputs)
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(shapes["params"])))


class ParamCountTest(parameterized.TestCase):

  def test_gpt2_small(self):
    self.assertEqual(_count(models.GPT(models.gpt2_small()), jnp.zeros((1, 8), jnp.int32)),
                     124_439_808)

  def test_bert_base_without_heads(self):
    self.assertEqual(_count(models.BERT(models.bert_base()), jnp.zeros((1, 8), jnp.int32)),
                     109_482_240)

  def test_vit_b16(self):
    self.assertEqual(_count(models.ViT(models.vit_b16(num_classes=1000)),
                            jnp.zeros((1, 224, 224, 3))), 86_567_656)

  def test_scan_layers_keeps_the_count(self):
    tokens = jnp.zeros((1, 8), jnp.int32)
    self.assertEqual(_count(models.GPT(models.gpt2_small(scan_layers=True)), tokens),
                     124_439_808)
