"""An image classifier that reads a context from another input: VGG + cross-attention, or a ResNet baseline.

The context is a text (through a small :class:`~mmfuse.encoders.text.TransformerTextEncoder` over a word
tokenizer fitted on the training contexts) or a second image (through a small
:class:`~mmfuse.encoders.vision.ConvEncoder`): either way a sequence of ``context_dim``-wide tokens that
the VGG feature maps cross-attend to (:class:`~mmfuse.models.vgg.VGGCrossAttention`, at the blocks in
``levels``). ``context="none"`` builds the plain classifier, which never sees the context.

Shapes::

    B  batch    L  context words    S  image side    Nc  context tokens (L, or h*w of the context image)

    images: (B, 3, S, S) uint8 (or float, already normalised)
    context_ids, context_mask: (B, L) int64 / bool      context_images: (B, 3, S, S) uint8
    logits: (B, num_classes)      weights[level]: (B, heads, h_level * w_level, Nc)

A saved classifier is ``config.json``, ``model.safetensors`` and ``vocab.json`` (the label names, in the
head's class order, and the context tokenizer).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from mmfuse.attention import IMPLS
from mmfuse.data.vocab import AnswerVocab, WordTokenizer, load_vocab, save_vocab
from mmfuse.encoders.resnet import ResNet
from mmfuse.encoders.text import TransformerTextEncoder
from mmfuse.encoders.vision import ConvEncoder
from mmfuse.io import CheckpointError, dataclass_from_dict
from mmfuse.layers.common import init_linear
from mmfuse.models.base import PretrainedModel
from mmfuse.models.vgg import VGGCrossAttention
from mmfuse.models.vqa import normalize_images

__all__ = ["BACKBONES", "ImageClassifier", "ImageClassifierConfig"]

MODEL_TYPE = "image_classifier"
VOCAB_NAME = "vocab.json"
BACKBONES = ("vgg11", "vgg16", "resnet18", "resnet50")


@dataclass
class ImageClassifierConfig:
    """Everything needed to rebuild an :class:`ImageClassifier`; saved as ``config.json``.

    ``backbone``: VGG (with cross-attention to the context at ``levels``) or ResNet (a plain baseline,
    ``context`` must be "none"). ``width`` multiplies every backbone channel count; ``batch_norm`` applies
    to VGG (ResNet always has it). ``context_dim`` is the width of the context tokens, ``context_depth``
    the text encoder's blocks; ``vocab_size`` and ``num_classes`` come from the training data.
    ``head``, ``residual``, ``mlp_ratio``: see :class:`~mmfuse.models.vgg.VGGCrossAttentionConfig` (ResNet
    always averages).
    ``dropout`` (the head's) defaults to 0.1, not VGG's 0.5: VGG drops half of 4096 hidden units, but a
    CPU-sized VGG (width 0.125: 64 hidden units) with 0.5 could not even fit one batch of 64 examples
    in 40 AdamW steps (loss stayed at ln 4), where with 0 it reached 69% of them.
    """

    num_classes: int
    backbone: Literal["vgg11", "vgg16", "resnet18", "resnet50"] = "vgg16"
    width: float = 1.0
    batch_norm: bool = True
    context: Literal["none", "text", "image"] = "none"
    context_dim: int = 128
    context_depth: int = 1
    vocab_size: int = 0
    max_length: int = 16
    num_heads: int = 8
    levels: tuple[int, ...] = (5,)
    head: Literal["mean", "flatten"] = "flatten"
    residual: Literal["norm", "gate"] = "norm"
    mlp_ratio: float = 0.0
    dropout: float = 0.1
    attn_dropout: float = 0.1
    impl: Literal["auto", "math", "chunked", "local", "lowrank"] = "auto"
    image_size: int = 224
    hidden_dim: int | None = None

    def __post_init__(self) -> None:
        self.levels = tuple(self.levels)
        if self.backbone not in BACKBONES:
            raise ValueError(f"backbone must be one of {BACKBONES}, got {self.backbone!r}")
        if self.context not in ("none", "text", "image"):
            raise ValueError(f"context must be 'none', 'text' or 'image', got {self.context!r}")
        if self.backbone.startswith("resnet") and self.context != "none":
            raise ValueError(f"backbone {self.backbone} is the baseline without context: use context='none' "
                             "(cross-attention is built on the VGG backbones)")
        if self.context == "text" and self.vocab_size < 4:
            raise ValueError(f"a text context needs vocab_size >= 4 (the tokenizer's), got {self.vocab_size}")
        for name in ("context_dim", "max_length", "num_classes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.context_depth < 0:
            raise ValueError(f"context_depth must be >= 0, got {self.context_depth}")
        if self.impl not in IMPLS:
            raise ValueError(f"impl must be one of {IMPLS}, got {self.impl!r}")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["levels"] = list(self.levels)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ImageClassifierConfig:
        d = dict(d)
        if d.pop("model_type", MODEL_TYPE) != MODEL_TYPE:
            raise ValueError(f"not an {MODEL_TYPE} config")
        return dataclass_from_dict(cls, d, "ImageClassifierConfig fields")


class ImageClassifier(PretrainedModel):
    """Backbone + (optionally) a context encoder; see the module docstring.

    ``labels`` names the classes (class i is ``labels.names[i]``); ``tokenizer`` is required for a
    text context.
    """

    model_type = MODEL_TYPE
    config_class = ImageClassifierConfig

    def __init__(self, config: ImageClassifierConfig, *, labels: AnswerVocab,
                 tokenizer: WordTokenizer | None = None) -> None:
        super().__init__()
        cfg = self.config = config
        if len(labels) != cfg.num_classes:
            raise ValueError(f"{len(labels)} label names for num_classes={cfg.num_classes}")
        self.labels = labels
        self.text: TransformerTextEncoder | None = None
        self.context_encoder: ConvEncoder | None = None
        if cfg.context == "text":
            if tokenizer is None or len(tokenizer) != cfg.vocab_size:
                raise ValueError(f"a text context needs its tokenizer of {cfg.vocab_size} words, got "
                                 f"{None if tokenizer is None else len(tokenizer)}")
            self.text = TransformerTextEncoder(tokenizer, dim=cfg.context_dim, depth=cfg.context_depth,
                                               num_heads=_heads(cfg.context_dim), max_length=cfg.max_length,
                                               dropout=cfg.attn_dropout, impl=cfg.impl)
        elif cfg.context == "image":
            c = cfg.context_dim
            self.context_encoder = ConvEncoder(((max(1, c // 4),), (max(1, c // 2),), (c,)), batch_norm=True,
                                               image_size=cfg.image_size)

        self.vgg: VGGCrossAttention | None = None
        self.resnet: ResNet | None = None
        if cfg.backbone.startswith("vgg"):
            self.vgg = VGGCrossAttention(
                cfg.num_classes, depth=int(cfg.backbone[3:]), batch_norm=cfg.batch_norm, width=cfg.width,
                context_dim=None if cfg.context == "none" else cfg.context_dim, num_heads=cfg.num_heads,
                levels=cfg.levels, dropout=cfg.dropout, attn_dropout=cfg.attn_dropout, impl=cfg.impl,
                image_size=cfg.image_size, hidden_dim=cfg.hidden_dim, head=cfg.head,
                residual=cfg.residual, mlp_ratio=cfg.mlp_ratio)
        else:
            self.resnet = ResNet(int(cfg.backbone[6:]), width=cfg.width, image_size=cfg.image_size)
            self.fc = nn.Linear(self.resnet.out_dim, cfg.num_classes)  # ResNet's head: average pool, one linear
            init_linear(self.fc)

    @property
    def tokenizer(self) -> WordTokenizer | None:
        return None if self.text is None else self.text.tokenizer

    def tokenize(self, texts: Sequence[str]) -> tuple[Tensor, Tensor]:
        """Context texts -> ``(ids (N, L), mask (N, L))`` with the model's own tokenizer."""
        if self.text is None:
            raise ValueError(f"this model takes a {self.config.context!r} context, not text")
        return self.text.tokenize(texts)

    def encode_context(self, context_ids: Tensor | None = None, context_mask: Tensor | None = None,
                       context_images: Tensor | None = None) -> tuple[Tensor | None, Tensor | None]:
        """The context tokens (B, Nc, context_dim) and their mask, or (None, None) for ``context="none"``."""
        kind = self.config.context
        if kind == "text":
            if context_ids is None or context_mask is None:
                raise ValueError("this model reads a text context: pass context_ids and context_mask (B, L)")
            return self.text(context_ids, context_mask), context_mask  # type: ignore[misc]
        if kind == "image":
            if context_images is None:
                raise ValueError("this model reads an image context: pass context_images (B, 3, S, S)")
            return self.context_encoder(normalize_images(context_images)), None  # type: ignore[misc]
        return None, None

    def forward(self, images: Tensor, context_ids: Tensor | None = None, context_mask: Tensor | None = None,
                context_images: Tensor | None = None, *,
                need_weights: bool = False) -> Tensor | tuple[Tensor, dict[int, Tensor]]:
        """Logits (B, num_classes); with ``need_weights`` also {level: (B, heads, h*w, Nc)} attention weights."""
        x = normalize_images(images)
        if self.resnet is not None:
            logits = self.fc(self.resnet.forward_features(x).mean(dim=(2, 3)))  # (B, num_classes)
            return (logits, {}) if need_weights else logits
        context, mask = self.encode_context(context_ids, context_mask, context_images)
        return self.vgg(x, context, context_mask=mask, need_weights=need_weights)  # type: ignore[misc]

    @torch.no_grad()
    def classify(self, images: Tensor, contexts: Sequence[str] | None = None,
                 context_images: Tensor | None = None) -> Tensor:
        """Class probabilities (B, num_classes) for uint8 images and their raw contexts."""
        ids = mask = None
        if self.config.context == "text":
            if contexts is None:
                raise ValueError("this model reads a text context: pass contexts")
            ids, mask = (t.to(images.device) for t in self.tokenize(contexts))
        logits = self(images, ids, mask, context_images)
        return logits.float().softmax(-1)

    def save_extra(self, directory: Path) -> None:
        tokenizer = self.tokenizer
        save_vocab(directory / VOCAB_NAME, tokenizer.to_dict() if tokenizer is not None else {"type": "none"},
                   self.labels)

    @classmethod
    def from_config(cls, config: ImageClassifierConfig, directory: Path | None = None) -> ImageClassifier:
        if directory is None:
            raise ValueError("a classifier needs its vocab.json: pass the directory, or build ImageClassifier(...)")
        path = directory / VOCAB_NAME
        try:
            tokenizer_dict, names = load_vocab(path)
            labels = AnswerVocab.from_dict({"names": names})
            tokenizer = WordTokenizer.from_dict(tokenizer_dict) if config.context == "text" else None
        except (OSError, KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: {e}") from e
        return cls(config, labels=labels, tokenizer=tokenizer)


def _heads(dim: int) -> int:
    """The text encoder's heads: 4 where the width allows (its own attention, not the fusion's)."""
    return next(h for h in (4, 2, 1) if dim % h == 0)
