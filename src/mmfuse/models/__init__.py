"""Models assembled from the encoders and fusion layers: one model, one file."""

from mmfuse.io import CheckpointError
from mmfuse.models.base import PretrainedModel, model_types
from mmfuse.models.classifier import ImageClassifier, ImageClassifierConfig
from mmfuse.models.vgg import VGGCrossAttention, VGGCrossAttentionConfig
from mmfuse.models.vqa import VQAConfig, VQAModel

__all__ = [
    "CheckpointError",
    "ImageClassifier",
    "ImageClassifierConfig",
    "PretrainedModel",
    "VGGCrossAttention",
    "VGGCrossAttentionConfig",
    "VQAConfig",
    "VQAModel",
    "model_types",
]
