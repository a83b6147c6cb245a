"""Building blocks: embeddings, MLP, norms, transformer blocks and the layer stack."""

from jaxformer.layers.embeddings import (POSITION_KINDS, Embed, LearnedPositionEmbed,
                                         PatchEmbed,
                                         TokenTypeEmbed, apply_rotary_embedding,
                                         check_position_kind, default_positions,
                                         positions_from_segment_ids,
                                         sinusoidal_embedding)
from jaxformer.layers.mlp import ACTIVATIONS, MLP, check_activation, dense
from jaxformer.norms import NORM_PLACEMENTS, NORM_TYPES, check_norm, make_norm

from jaxformer.layers.blocks import BlockConfig, DecoderBlock, EncoderBlock
from jaxformer.layers.stack import Stack, stack_layer_params, unstack_layer_params

__all__ = [
    # embeddings
    "POSITION_KINDS", "Embed", "LearnedPositionEmbed", "PatchEmbed",
    "TokenTypeEmbed", "apply_rotary_embedding",
    "check_position_kind", "default_positions", "positions_from_segment_ids",
    "sinusoidal_embedding",
    # mlp
    "ACTIVATIONS", "MLP", "check_activation", "dense",
    # norms
    "NORM_PLACEMENTS", "NORM_TYPES", "check_norm", "make_norm",
    # blocks
    "BlockConfig", "DecoderBlock", "EncoderBlock", "Stack", "stack_layer_params",
    "unstack_layer_params",
]
