"""Models assembled from the encoders and fusion layers: one model, one file."""

from mmfuse.io import CheckpointError
from mmfuse.models.vgg import VGGCrossAttention, VGGCrossAttentionConfig
from mmfuse.models.vqa import VQAConfig, VQAModel

__all__ = ["CheckpointError", "VGGCrossAttention", "VGGCrossAttentionConfig", "VQAConfig", "VQAModel"]
