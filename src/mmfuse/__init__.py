"""mmfuse: attention-based fusion of images and text.

Layers (``CrossAttention``, ``AttentionPooling``, ...), the fusion registry (``mmfuse.fusion.create``),
models (``VQAModel``, ``VGGCrossAttention``, ``Captioner``), data, training and evaluation.
"""

from mmfuse import fusion
from mmfuse.attention import IMPLS, Attention, KVCache, attend
from mmfuse.fusion import FusionOutput
from mmfuse.layers import (
    AttentionBlock,
    AttentionPooling,
    CrossAttention,
    FeedForward,
    FusionTransformer,
    GatedCrossAttention,
    ModalitySelfAttention,
    ModalityTokens,
    masked_mean,
)
from mmfuse.models import Captioner, CaptionerConfig, VGGCrossAttention, VGGCrossAttentionConfig, VQAConfig, VQAModel

__version__ = "0.1.0"

__all__ = [
    "IMPLS",
    "Attention",
    "AttentionBlock",
    "AttentionPooling",
    "Captioner",
    "CaptionerConfig",
    "CrossAttention",
    "FeedForward",
    "FusionOutput",
    "FusionTransformer",
    "GatedCrossAttention",
    "KVCache",
    "ModalitySelfAttention",
    "ModalityTokens",
    "VGGCrossAttention",
    "VGGCrossAttentionConfig",
    "VQAConfig",
    "VQAModel",
    "attend",
    "fusion",
    "masked_mean",
]
