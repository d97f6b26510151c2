"""Reusable fusion layers: cross-attention, attention pooling, self- and gated cross-attention."""

from mmfuse.layers.attention_pool import AttentionPooling
from mmfuse.layers.common import FeedForward, masked_mean
from mmfuse.layers.cross_attention import AttentionBlock, CrossAttention
from mmfuse.layers.fusion_transformer import FusionTransformer
from mmfuse.layers.gated import GatedCrossAttention
from mmfuse.layers.self_fusion import ModalitySelfAttention, ModalityTokens

__all__ = [
    "AttentionBlock",
    "AttentionPooling",
    "CrossAttention",
    "FeedForward",
    "FusionTransformer",
    "GatedCrossAttention",
    "ModalitySelfAttention",
    "ModalityTokens",
    "masked_mean",
]
