"""Models: GPT, BERT, EncoderDecoder, ViT, ImageGPT, axial transformers (+ presets).

Each model takes one frozen config dataclass, passed whole, that holds one
``BlockConfig`` in ``block``; presets are functions that return a config and accept
overrides, block fields flat or nested (``gpt2_small(dropout_rate=0.0)`` ==
``gpt2_small(block={"dropout_rate": 0.0})``); ``override(cfg, ...)`` does the same to
any config. ``registry`` names models and presets and turns configs into dicts and back.
``jaxformer.models.common`` holds the helpers the models share (input checks, position
handling); it is internal to the models.
"""

from jaxformer.models.axial_transformer import (ALONG_COLUMN, ALONG_ROW, AxialBlock,
                                                AxialClassifier,
                                                AxialTransformer,
                                                AxialTransformerConfig, axial_cifar10,
                                                axial_tiny)
from jaxformer.models.bert import (BERT, POOLINGS, BERTConfig, bert_base, bert_large,
                                   bert_tiny, masked_pool, nyu_imdb_classifier)
from jaxformer.models.common import replace as override
from jaxformer.models.encoder_decoder import (EncoderDecoder, EncoderDecoderConfig,
                                              transformer_base, transformer_big,
                                              transformer_tiny)
from jaxformer.models.gpt import (GPT, GPTConfig, gpt2_large, gpt2_medium, gpt2_small,
                                  gpt2_xl, gpt_nano, gpt_tiny)
from jaxformer.models.image_gpt import (ImageGPT, ImageGPTConfig, color_dequantize,
                                        color_quantize, image_gpt_inputs, image_gpt_small,
                                        image_gpt_tiny)
from jaxformer.models.vit import ViT, ViTConfig, vit_b16, vit_l16, vit_s16, vit_tiny
from jaxformer.models.registry import (MODELS, PRESETS, build_model, check_shardable,
                                       config_from_dict, config_to_dict, example_inputs,
                                       logical_axis_sizes, num_params, preset_dict)

__all__ = [
    "GPT", "GPTConfig", "gpt2_small", "gpt2_medium", "gpt2_large", "gpt2_xl", "gpt_nano",
    "gpt_tiny",
    "BERT", "BERTConfig", "POOLINGS", "bert_base", "bert_large", "bert_tiny",
    "nyu_imdb_classifier", "masked_pool",
    "EncoderDecoder", "EncoderDecoderConfig", "transformer_base", "transformer_big",
    "transformer_tiny",
    "ViT", "ViTConfig", "vit_b16", "vit_s16", "vit_l16", "vit_tiny",
    "ImageGPT", "ImageGPTConfig", "image_gpt_small", "image_gpt_tiny", "image_gpt_inputs",
    "color_quantize", "color_dequantize",
    "AxialTransformer", "AxialClassifier", "AxialBlock", "AxialTransformerConfig",
    "axial_tiny", "axial_cifar10", "ALONG_ROW", "ALONG_COLUMN",
    "override", "MODELS", "PRESETS", "build_model", "check_shardable", "config_from_dict",
    "config_to_dict", "example_inputs", "logical_axis_sizes", "num_params", "preset_dict",
]
