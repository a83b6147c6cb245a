"""Attention: the functional core, masks, RoPE, the multi-head module, axial attention.

```python
from jaxformer.attention import dot_product_attention, MultiHeadAttention, AxialAttention
out_BQHD = dot_product_attention(q_BQHD, k_BSKD, v_BSKD, is_causal=True)
```
See ``core.py`` for the implementations (``"xla"``, ``"chunked"``, ``"pallas"``,
``"cudnn"``) and how ``implementation=None`` chooses between them.
"""

from jaxformer.attention.axial import AxialAttention, AxialAttentionStack, axial_attention_stack
from jaxformer.attention.chunked import chunked_attention
from jaxformer.attention.core import dot_product_attention, xla_attention
from jaxformer.attention.masks import (combine_masks, make_causal_mask, make_key_mask,
                                       make_padding_mask, make_prefix_mask,
                                       make_segment_mask)
from jaxformer.attention.multi_head import MultiHeadAttention
from jaxformer.attention.rotary import apply_rotary_embedding

__all__ = [
    "AxialAttention",
    "AxialAttentionStack",
    "MultiHeadAttention",
    "apply_rotary_embedding",
    "axial_attention_stack",
    "chunked_attention",
    "combine_masks",
    "dot_product_attention",
    "make_causal_mask",
    "make_key_mask",
    "make_padding_mask",
    "make_prefix_mask",
    "make_segment_mask",
    "xla_attention",
]
