"""Models: GPT, BERT, EncoderDecoder, ViT, ImageGPT, axial transformers (+ presets).

Each model takes one frozen config dataclass, passed whole; presets are functions that
return a config and accept field overrides (``gpt2_small(dropout_rate=0.0)``).
``jaxformer.models.common`` holds the helpers the models share (input checks, position
handling); it is internal to the models and not re-exported here.
"""

from jaxformer.models.axial_transformer import (ALONG_COLUMN, ALONG_ROW, AxialBlock,
                                                AxialClassifier,
                                                AxialTransformer,
                                                AxialTransformerConfig, axial_cifar10,
                                                axial_tiny)
from jaxformer.models.bert import (BERT, BERTConfig, bert_base, bert_large, bert_tiny,
                                   masked_pool)
from jaxformer.models.encoder_decoder import (EncoderDecoder, EncoderDecoderConfig,
                                              transformer_base, transformer_big,
                                              transformer_tiny)
from jaxformer.models.gpt import (GPT, GPTConfig, gpt2_large, gpt2_medium, gpt2_small,
                                  gpt2_xl, gpt_nano, gpt_tiny)
from jaxformer.models.image_gpt import (ImageGPT, ImageGPTConfig, color_dequantize,
                                        color_quantize, image_gpt_inputs, image_gpt_small,
                                        image_gpt_tiny)
from jaxformer.models.vit import ViT, ViTConfig, vit_b16, vit_l16, vit_s16, vit_tiny

__all__ = [
    "GPT", "GPTConfig", "gpt2_small", "gpt2_medium", "gpt2_large", "gpt2_xl", "gpt_nano",
    "gpt_tiny",
    "BERT", "BERTConfig", "bert_base", "bert_large", "bert_tiny", "masked_pool",
    "EncoderDecoder", "EncoderDecoderConfig", "transformer_base", "transformer_big",
    "transformer_tiny",
    "ViT", "ViTConfig", "vit_b16", "vit_s16", "vit_l16", "vit_tiny",
    "ImageGPT", "ImageGPTConfig", "image_gpt_small", "image_gpt_tiny", "image_gpt_inputs",
    "color_quantize", "color_dequantize",
    "AxialTransformer", "AxialClassifier", "AxialBlock", "AxialTransformerConfig",
    "axial_tiny", "axial_cifar10", "ALONG_ROW", "ALONG_COLUMN",
]
