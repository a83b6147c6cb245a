"""jaxformer: a JAX/Flax (Linen) research codebase for transformers.

Layers, bottom up: ``kernels`` (Pallas, jax only) -> ``jaxformer.attention`` ->
``jaxformer.layers`` -> ``jaxformer.models`` -> ``jaxformer.objectives`` /
``jaxformer.data`` -> ``jaxformer.tasks`` (one module per task) ->
``jaxformer.training`` / ``jaxformer.generation`` -> ``experiments``.
"""

__version__ = "0.1.0"
