"""Looking inside trained models: attention maps per layer/head, rollout, axial maps;
token-embedding similarity and nearest neighbours."""

from jaxformer.analysis.attention_maps import (attention_rollout, attention_weights,
                                               axial_attention_maps, axial_pixel_map,
                                               collect_weights, layer_weights,
                                               to_numpy, unfold_axial, vit_rollout,
                                               with_weights)
from jaxformer.analysis.embeddings import (cosine_similarity, embedding_table,
                                           nearest_neighbours)

__all__ = [
    "attention_rollout", "attention_weights", "axial_attention_maps", "axial_pixel_map",
    "collect_weights", "layer_weights", "to_numpy", "unfold_axial", "vit_rollout",
    "with_weights", "cosine_similarity", "embedding_table", "nearest_neighbours",
]
