"""Models assembled from the encoders and fusion layers: one model, one file."""

from mmfuse.io import CheckpointError
from mmfuse.models.base import PretrainedModel, model_types
from mmfuse.models.captioner import Captioner, CaptionerConfig
from mmfuse.models.classifier import ImageClassifier, ImageClassifierConfig
from mmfuse.models.gated_lm import GatedLM, LMTokenizer
from mmfuse.models.vgg import VGGCrossAttention, VGGCrossAttentionConfig
from mmfuse.models.vqa import VQAConfig, VQAModel

__all__ = [
    "Captioner",
    "CaptionerConfig",
    "CheckpointError",
    "GatedLM",
    "ImageClassifier",
    "ImageClassifierConfig",
    "LMTokenizer",
    "PretrainedModel",
    "VGGCrossAttention",
    "VGGCrossAttentionConfig",
    "VQAConfig",
    "VQAModel",
    "model_types",
]
