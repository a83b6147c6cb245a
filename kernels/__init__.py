"""Pallas kernels for jaxformer. Depends on jax only (never on jaxformer)."""

from kernels.flash_attention import flash_attention

__all__ = ["flash_attention"]
