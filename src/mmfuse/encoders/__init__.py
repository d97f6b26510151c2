"""Vision encoders (tokens per feature-map position) and text encoders (tokens per word), with the word tokenizer."""

from mmfuse.encoders.hf import HFTextEncoder, default_hf_model_path
from mmfuse.encoders.hf_vision import HFVisionEncoder
from mmfuse.encoders.text import TransformerTextEncoder
from mmfuse.encoders.tokenizer import WordTokenizer
from mmfuse.encoders.vgg import VGG, VGG_CHANNELS
from mmfuse.encoders.vision import (
    ConvEncoder,
    PositionalEmbedding2d,
    feature_map_to_tokens,
    tokens_to_feature_map,
)

__all__ = [
    "VGG",
    "VGG_CHANNELS",
    "ConvEncoder",
    "HFTextEncoder",
    "HFVisionEncoder",
    "PositionalEmbedding2d",
    "TransformerTextEncoder",
    "WordTokenizer",
    "default_hf_model_path",
    "feature_map_to_tokens",
    "tokens_to_feature_map",
]
