"""mmfuse: attention-based fusion of images and text.

Layers (``CrossAttention``, ``AttentionPooling``, ...), the fusion registry (``mmfuse.fusion.create``),
models (``VQAModel``, ``VGGCrossAttention``, ``Captioner``), data, training and evaluation.

The models are imported on first use (``mmfuse.VQAModel``): they bring the data package and its image
libraries, which the attention layers alone do not need.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from mmfuse import fusion
from mmfuse.attention import IMPLS, Attention, AttentionConfig, KVCache, attend
from mmfuse.fusion import FusionOutput
from mmfuse.layers import (
    AttentionBlock,
    AttentionPooling,
    CoAttention,
    CrossAttention,
    FeedForward,
    GatedCrossAttention,
    ModalitySelfAttention,
    ModalityTokens,
    masked_mean,
)

if TYPE_CHECKING:
    from mmfuse.models import (
        Captioner,
        CaptionerConfig,
        VGGCrossAttention,
        VGGCrossAttentionConfig,
        VQAConfig,
        VQAModel,
    )

__version__ = "0.1.0"

__all__ = [
    "IMPLS",
    "Attention",
    "AttentionBlock",
    "AttentionConfig",
    "AttentionPooling",
    "Captioner",
    "CaptionerConfig",
    "CoAttention",
    "CrossAttention",
    "FeedForward",
    "FusionOutput",
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

_LAZY = {"Captioner": "mmfuse.models", "CaptionerConfig": "mmfuse.models",
         "VGGCrossAttention": "mmfuse.models", "VGGCrossAttentionConfig": "mmfuse.models",
         "VQAConfig": "mmfuse.models", "VQAModel": "mmfuse.models"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mmfuse' has no attribute {name!r}")
