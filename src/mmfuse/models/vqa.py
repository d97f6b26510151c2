"""Visual question answering: vision encoder -> [attention pooling] -> fusion with the question -> answer.

Shapes::

    I  images in the batch     Q  questions (several per image)     L  question tokens
    N  image tokens            A  answers

    images: (I, 3, S, S) uint8 (or float, already normalised)    image_index: (Q,) question -> image
    ids, text_mask: (Q, L)                                          logits: (Q, A)

Each image is encoded once and its tokens are shared by all of its questions (``image_index``); on
easy-VQA about ten questions share an image, so this is the main saving of training.

``images`` may also be image tokens ``(I, N, D)`` float: features computed beforehand (``vision="features"``,
a dataset that gives ``image_features`` files) or a frozen backbone's cached output; the vision encoder
is then skipped. ``vision="hf:PATH"`` is a local Hugging Face vision model
(:class:`~mmfuse.encoders.hf_vision.HFVisionEncoder`), frozen unless ``vision_finetune``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from mmfuse import fusion as fusion_registry
from mmfuse.attention import AttentionConfig
from mmfuse.data.vocab import AnswerVocab, load_vocab, save_vocab
from mmfuse.encoders.text import TransformerTextEncoder
from mmfuse.encoders.tokenizer import WordTokenizer
from mmfuse.encoders.vgg import VGG
from mmfuse.encoders.vision import ConvEncoder
from mmfuse.fusion import FusionOutput
from mmfuse.io import CheckpointError, check_bounds, dataclass_from_dict
from mmfuse.layers import AttentionPooling
from mmfuse.layers.common import gather_rows
from mmfuse.models.base import PretrainedModel

__all__ = ["VQAConfig", "VQAModel", "normalize_images"]

VOCAB_NAME = "vocab.json"
_MODEL_TYPE = "vqa"


def normalize_images(images: Tensor) -> Tensor:
    """uint8 RGB in [0, 255] -> float in about [-2, 2]; float input is taken as already normalised."""
    if images.dtype == torch.uint8:
        return images.float().mul_(1.0 / 63.75).sub_(2.0)  # (x / 255 - 0.5) / 0.25
    return images


# Each size's plausible range: far beyond what the model needs, short of sizes that allocate for minutes.
_BOUNDS = {"num_answers": (1, 1_000_000), "vocab_size": (0, 10_000_000), "image_size": (8, 2048),
           "vgg_width": (1 / 64, 4), "pool_queries": (0, 4096), "text_dim": (1, 8192), "text_depth": (1, 64),
           "text_heads": (1, 256), "max_length": (1, 8192), "dim": (1, 8192), "num_heads": (1, 256), "depth": (1, 64),
           "dropout": (0, 0.99), "head_hidden": (0, 65536), "feature_dim": (0, 65536)}


@dataclass
class VQAConfig:
    """Everything needed to rebuild a :class:`VQAModel` (saved as ``config.json``)."""

    num_answers: int
    vocab_size: int = 0  # word-level tokenizer size; 0 with a Hugging Face text encoder
    image_size: int = 64
    resize: Literal["squash", "pad", "crop"] = "squash"  # non-square images: stretch, letterbox or centre-crop
    # vision
    vision: str = "cnn"  # "cnn", "vgg11", "vgg16", "hf:PATH" (a Hugging Face model folder) or "features"
    vision_finetune: bool = False  # train an hf: vision model too (default: frozen)
    feature_dim: int = 0  # vision="features": the width D of the precomputed image tokens
    cnn_stages: list[list[int]] = field(default_factory=lambda: [[16], [32], [64]])
    vgg_width: float = 0.25
    batch_norm: bool = True
    cnn_coordinates: bool = False  # vision="cnn": CoordConv, two coordinate channels on the image
    pool_queries: int = 0  # > 0: AttentionPooling of the image tokens to this many latents
    # text
    text: str = "transformer"  # "transformer", "hf" (hf_path; None = the bundled MiniLM) or "hf:PATH"
    text_pooling: Literal["none", "cls", "mean"] = "none"  # hf text: every token, or one pooled token
    text_dim: int = 64
    text_depth: int = 1
    text_heads: int = 4
    max_length: int = 32
    hf_path: str | None = None
    hf_freeze: bool = True
    # fusion and head
    fusion: str = "fusion_transformer"
    dim: int = 64
    num_heads: int = 4
    depth: int = 2
    dropout: float = 0.0  # easy-VQA needs none; dropout also costs ~15% of a CPU step
    impl: str = "auto"  # at VQA's short sequences (~11 question tokens, 64 image tokens) auto runs math on CPU
    # options of impl (mmfuse.attention.AttentionConfig; None = the implementation's default). lowrank's
    # max_len is not among them: each layer's comes from the sequences it attends over.
    window: int | None = None  # local
    num_global: int | None = None  # local
    block_q: int | None = None  # chunked, local
    block_k: int | None = None  # chunked, local
    rank: int | None = None  # lowrank
    # > 0: an MLP answer head with this many hidden units. With a linear head (0) the default easy-VQA run
    # answered image-dependent "is there a <shape>?" questions from the prior in three runs of four
    # (93.5-96.3%); with 128 six runs ended at 98.9-99.99% (README, "Results").
    head_hidden: int = 128
    fusion_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.num_answers < 1:
            raise ValueError(f"num_answers must be >= 1, got {self.num_answers}")
        if self.fusion not in fusion_registry.available():
            raise ValueError(f"unknown fusion {self.fusion!r}; choose one of {fusion_registry.available()}")
        if self.vision not in ("cnn", "vgg11", "vgg16", "features") and not self.vision.startswith("hf:"):
            raise ValueError(f"vision must be 'cnn', 'vgg11', 'vgg16', 'features' or 'hf:PATH', got {self.vision!r}")
        if self.vision == "hf:":
            raise ValueError("vision='hf:PATH' needs the folder of a Hugging Face vision model after 'hf:'")
        if self.cnn_coordinates and self.vision != "cnn":
            raise ValueError(f"cnn_coordinates applies to vision='cnn' only, got vision={self.vision!r}")
        if self.vision == "features" and self.feature_dim < 1:
            raise ValueError("vision='features' needs feature_dim, the width of the precomputed image tokens")
        if self.text.startswith("hf:"):  # one spelling in saved configs: text="hf" + hf_path
            if len(self.text) == 3:
                raise ValueError("text='hf:PATH' needs the folder of a Hugging Face model after 'hf:'")
            self.text, self.hf_path = "hf", self.text[3:]
        if self.text not in ("transformer", "hf"):
            raise ValueError(f"text must be 'transformer', 'hf' or 'hf:PATH', got {self.text!r}")
        if self.resize not in ("squash", "pad", "crop"):
            raise ValueError(f"resize must be 'squash', 'pad' or 'crop', got {self.resize!r}")
        if self.text_pooling not in ("none", "cls", "mean"):
            raise ValueError(f"text_pooling must be 'none', 'cls' or 'mean', got {self.text_pooling!r}")
        if self.text == "transformer" and self.vocab_size < 3:
            raise ValueError("a transformer text encoder needs vocab_size (the word tokenizer's size)")
        self.attention  # noqa: B018 - raises for options impl does not take, or a missing window / rank
        check_bounds(self, _BOUNDS)

        def channels(stage: object) -> bool:
            return isinstance(stage, list) and bool(stage) and all(
                isinstance(c, int) and not isinstance(c, bool) and 1 <= c <= 4096 for c in stage)

        if not isinstance(self.cnn_stages, list) or not self.cnn_stages or not all(map(channels, self.cnn_stages)):
            raise ValueError(f"cnn_stages must be a non-empty list of non-empty lists of channel counts in "
                             f"[1, 4096], got {self.cnn_stages!r}")

    @property
    def attention(self) -> AttentionConfig:
        """``impl`` and its options as the configuration every attention layer of the model gets."""
        return AttentionConfig(self.impl, window=self.window, num_global=self.num_global, block_q=self.block_q,
                               block_k=self.block_k, rank=self.rank)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VQAConfig:
        d = dict(d)
        model_type = d.pop("model_type", _MODEL_TYPE)
        if model_type != _MODEL_TYPE:
            raise ValueError(f"not a VQA model config (model_type={model_type!r})")
        return dataclass_from_dict(cls, d, "config keys")


class VQAModel(PretrainedModel):
    """The VQA model of mmfuse; see the module docstring for shapes.

    ``forward`` returns answer logits; the training loop lives in :mod:`mmfuse.train`. The word
    tokenizer and answer vocabulary travel with the model (``vocab.json``).
    """

    model_type = _MODEL_TYPE
    config_class = VQAConfig

    def __init__(self, config: VQAConfig, *, answers: AnswerVocab,
                 tokenizer: WordTokenizer | None = None) -> None:
        super().__init__()
        if len(answers) != config.num_answers:
            raise ValueError(f"config.num_answers={config.num_answers} but {len(answers)} answers given")
        self.config = config
        self.answers = answers
        c = config

        self.vision: nn.Module | None
        if c.vision == "cnn":
            self.vision = ConvEncoder(c.cnn_stages, batch_norm=c.batch_norm, image_size=c.image_size,
                                      coordinates=c.cnn_coordinates)
        elif c.vision in ("vgg11", "vgg16"):
            self.vision = VGG(11 if c.vision == "vgg11" else 16, batch_norm=c.batch_norm, width=c.vgg_width,
                              image_size=c.image_size)
        elif c.vision == "features":
            self.vision = None
        else:
            from mmfuse.encoders.hf_vision import HFVisionEncoder

            self.vision = HFVisionEncoder(c.vision[3:], freeze=not c.vision_finetune)
        #: the width D of the image tokens the fusion receives
        self.vision_dim: int = c.feature_dim if self.vision is None else self.vision.out_dim
        attention = c.attention
        # How many image tokens there are (lowrank attention sizes its projections by it): a CNN's grid, an
        # hf: backbone's count; unknown for precomputed features.
        if self.vision is None:
            grid_tokens: int | None = None
        elif hasattr(self.vision, "grid"):
            h, w = self.vision.grid(c.image_size)
            grid_tokens = h * w
        else:
            grid_tokens = self.vision.num_tokens
        self.pool = (AttentionPooling(self.vision_dim, num_queries=c.pool_queries, num_heads=c.num_heads,
                                      impl=attention, max_tokens=grid_tokens) if c.pool_queries > 0 else None)
        image_tokens = c.pool_queries or grid_tokens  # what the fusion sees of an image

        if c.text == "transformer":
            if tokenizer is None:
                raise ValueError("a transformer text encoder needs the word tokenizer")
            if len(tokenizer) != c.vocab_size:
                raise ValueError(f"config.vocab_size={c.vocab_size} but the tokenizer has {len(tokenizer)} words")
            self.text: nn.Module = TransformerTextEncoder(
                tokenizer, dim=c.text_dim, depth=c.text_depth, num_heads=c.text_heads,
                max_length=c.max_length, dropout=c.dropout, impl=attention)
        else:
            from mmfuse.encoders.hf import HFTextEncoder

            self.text = HFTextEncoder(c.hf_path, freeze=c.hf_freeze, max_length=c.max_length,
                                      pooling=c.text_pooling)

        self.fusion = fusion_registry.create(
            c.fusion, image_dim=self.vision_dim, text_dim=self.text.out_dim, dim=c.dim,
            num_heads=c.num_heads, depth=c.depth, dropout=c.dropout, impl=attention,
            max_image_tokens=image_tokens, max_text_tokens=c.max_length, **c.fusion_options)
        d = self.fusion.out_dim
        # A hidden layer lets the head combine features the pooling put side by side (e.g. "not" and
        # "a red shape is present" for a negated question), which a linear head cannot.
        hidden = [nn.Linear(d, c.head_hidden), nn.GELU()] if c.head_hidden else []
        self.head = nn.Sequential(nn.LayerNorm(d), *hidden, nn.Dropout(c.dropout),
                                  nn.Linear(c.head_hidden or d, c.num_answers))

    # ----------------------------------------------------------------------------------------------
    def tokenize(self, questions: Sequence[str]) -> tuple[Tensor, Tensor]:
        """Questions -> ``(ids (Q, L), mask (Q, L))`` with the model's own tokenizer."""
        return self.text.tokenize(list(questions))

    def encode_images(self, images: Tensor) -> Tensor:
        """(I, 3, S, S) -> image tokens (I, N, C): the vision encoder, then the optional pooling.

        Image tokens (I, N, vision_dim) given instead of images skip the vision encoder."""
        if images.dim() == 3:  # precomputed tokens
            if images.shape[-1] != self.vision_dim:
                raise ValueError(f"image tokens must be (I, N, {self.vision_dim}), got {tuple(images.shape)}")
            tokens = images.float()
        elif self.vision is None:
            raise ValueError(f"this model takes precomputed image tokens (I, N, {self.vision_dim}), "
                             f"got {tuple(images.shape)}")
        elif self.config.vision.startswith("hf:"):
            tokens = self.vision(images)  # (I, N, C); the model's own preprocessing
        else:
            tokens = self.vision(normalize_images(images))  # (I, h*w, C)
        if self.pool is not None:
            tokens, _ = self.pool(tokens)  # (I, pool_queries, C)
        return tokens

    def encode_questions(self, ids: Tensor, text_mask: Tensor) -> Tensor:
        """Text tokens (Q, L, text_dim), each distinct question encoded once.

        Datasets repeat questions ("what color is the shape?" is asked of many images), so a batch
        holds far fewer distinct questions than rows. Identical rows share one encoding (and, in
        training, one dropout mask).
        """
        rows = torch.cat([ids, text_mask.to(ids.dtype)], dim=1)  # (Q, 2L)
        unique, inverse = torch.unique(rows, dim=0, return_inverse=True)  # (U, 2L), (Q,)
        if unique.shape[0] == rows.shape[0]:
            return self.text(ids, text_mask)
        L = ids.shape[1]
        # gather_rows, not [inverse]: the indexing's scatter-add backward is not deterministic on 2+ threads.
        return gather_rows(self.text(unique[:, :L], unique[:, L:].bool()), inverse)  # (Q, L, text_dim)

    def fuse(self, images: Tensor, ids: Tensor, text_mask: Tensor, image_index: Tensor | None = None, *,
             need_weights: bool = False) -> FusionOutput:
        """The fusion's output for each question; ``image_index`` None means one image per question."""
        if ids.dim() != 2 or tuple(text_mask.shape) != tuple(ids.shape):
            raise ValueError(f"ids and text_mask must both be (Q, L), got {tuple(ids.shape)} and "
                             f"{tuple(text_mask.shape)}")
        image_tokens = self.encode_images(images)  # (I, N, C)
        if image_index is None and image_tokens.shape[0] != ids.shape[0]:
            raise ValueError(f"{image_tokens.shape[0]} images for {ids.shape[0]} questions: pass image_index")
        text_tokens = self.encode_questions(ids, text_mask)  # (Q, L, text_dim)
        if text_tokens.shape[1] != text_mask.shape[1]:  # a pooled text encoder: one token per question
            text_mask = text_mask.new_ones(text_tokens.shape[:2])  # (Q, 1)
        # The fusion gathers per question itself, after its per-image work (see mmfuse.fusion).
        return self.fusion(image_tokens, text_tokens, text_mask=text_mask, image_index=image_index,
                           need_weights=need_weights)

    def forward(self, images: Tensor, ids: Tensor, text_mask: Tensor,
                image_index: Tensor | None = None) -> Tensor:
        return self.head(self.fuse(images, ids, text_mask, image_index).pooled)  # (Q, A)

    @torch.no_grad()
    def answer(self, images: Tensor, questions: Sequence[str], image_index: Tensor | None = None) -> Tensor:
        """Answer probabilities (Q, A) for raw questions."""
        ids, mask = self.tokenize(questions)
        return self(images, ids, mask, image_index).softmax(dim=-1)

    # ----------------------------------------------------------------------------------------------
    def _tokenizer_dict(self) -> dict[str, Any]:
        tokenizer = getattr(self.text, "tokenizer", None)
        return tokenizer.to_dict() if isinstance(tokenizer, WordTokenizer) else {"type": "hf"}

    def save_extra(self, directory: Path) -> None:
        save_vocab(directory / VOCAB_NAME, self._tokenizer_dict(), self.answers)

    def checkpoint_metadata(self) -> dict[str, str]:
        # The answer head's class i is answers[i]: a reordered vocab.json would silently swap answers.
        text = json.dumps([self._tokenizer_dict(), self.answers.names], sort_keys=True)
        return {"vocab_sha256": hashlib.sha256(text.encode()).hexdigest()}

    @classmethod
    def from_config(cls, config: VQAConfig, directory: Path | None = None) -> VQAModel:
        """A model for ``config`` with the tokenizer and answers saved in ``directory / vocab.json``."""
        if directory is None:
            raise ValueError("a VQA model needs its vocab.json: pass the directory, or build VQAModel(...)")
        vocab_path = directory / VOCAB_NAME
        try:
            tokenizer_dict, answer_names = load_vocab(vocab_path)
            answers = AnswerVocab.from_dict({"names": answer_names})
            tokenizer = WordTokenizer.from_dict(tokenizer_dict) if config.text == "transformer" else None
        except (OSError, KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{vocab_path}: {e}") from e
        try:
            return cls(config, answers=answers, tokenizer=tokenizer)
        except FileNotFoundError as e:  # a backbone folder named by the config, moved or deleted since
            raise CheckpointError(f"{directory}: {e}; put the folder back, or set hf_path / vision in "
                                  f"{directory / 'config.json'} to where it is now") from e
