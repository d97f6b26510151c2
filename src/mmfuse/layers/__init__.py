"""Reusable fusion layers: cross-attention, attention pooling, self-, gated and co-attention."""

from mmfuse.layers.attention_pool import AttentionPooling
from mmfuse.layers.co_attention import CoAttention
from mmfuse.layers.common import FeedForward, masked_mean
from mmfuse.layers.cross_attention import AttentionBlock, CrossAttention
from mmfuse.layers.gated import GatedCrossAttention
from mmfuse.layers.self_fusion import ModalitySelfAttention, ModalityTokens

__all__ = [
    "AttentionBlock",
    "AttentionPooling",
    "CoAttention",
    "CrossAttention",
    "FeedForward",
    "GatedCrossAttention",
    "ModalitySelfAttention",
    "ModalityTokens",
    "masked_mean",
]
