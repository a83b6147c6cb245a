"""jaxformer: a JAX/Flax (Linen) research codebase for transformers.

Layers, bottom up: ``kernels`` (Pallas, jax only) -> ``jaxformer.attention`` ->
``jaxformer.layers`` -> ``jaxformer.models`` -> ``jaxformer.objectives`` /
``jaxformer.training`` / ``jaxformer.generation`` -> ``experiments``.
"""

__version__ = "0.1.0"
