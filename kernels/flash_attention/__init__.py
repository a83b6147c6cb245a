"""Fused flash attention: Mosaic GPU (Hopper), Triton (GPU), Mosaic (TPU).

    from kernels.flash_attention import flash_attention, supports, BlockSizes
    out_BLHD = flash_attention(q_BLHD, k_BLKD, v_BLKD, is_causal=True)

Files: api.py (entry point, dispatch, custom_vjp), checks.py (input checks,
supports), reference.py (einsum reference), gpu.py / gpu_vjp.py (Triton forward /
backward), mosaic_gpu.py / mosaic_gpu_vjp.py (Mosaic GPU forward / backward, sm_90),
tpu.py (Mosaic), common.py (masks and tile ranges), block_sizes.py (tiles, per-backend
defaults), block_table.py (tuned tiles as JSON), autotune.py.
"""

from kernels.flash_attention.api import flash_attention
from kernels.flash_attention.api import supports
from kernels.flash_attention.autotune import autotune
from kernels.flash_attention.autotune import autotune_table
from kernels.flash_attention.block_sizes import BlockSizes
from kernels.flash_attention.block_table import BlockTable
from kernels.flash_attention.reference import attention_reference

__all__ = ["flash_attention", "supports", "BlockSizes", "BlockTable",
           "autotune", "autotune_table", "attention_reference"]
