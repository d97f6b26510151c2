"""VGG with cross-attention to context tokens from another model (single- or multi-level).

After each VGG block listed in ``levels`` (any of blocks 2-5) the feature-map positions become query
tokens that cross-attend to the context tokens (text tokens, another image's patches...); the result is
added back (residual, dropout, LayerNorm) and reshaped into the map the next block convolves. After the
last block the map is mean-pooled and classified by a small MLP.

Each level has its own cross-attention, whose key and value projections adapt the context to that
level's width (``context_dim`` -> 128 channels after block 2, 512 after block 5 for VGG16), so one
context serves every level. A level whose grid is 1x1 (VGG16's block 5 on a 32x32 image) attends from a
single position: the whole image is one query, and the map cannot show where anything is; the model
warns about it when it is built.

Shapes::

    B   batch            Nc  context tokens        C_l  channels after block l
    h_l, w_l  grid after block l (7x7 after block 5 for a 224x224 image)

    images: (B, 3, H, W)   context: (B, Nc, context_dim)   context_mask: (B, Nc) bool, True = keep
    logits: (B, num_classes)   weights[l]: (B, num_heads, h_l * w_l, Nc)

Without context (``context=None``, or a model built with ``context_dim=None``) it is a plain VGG
classifier: the attention steps are skipped.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmfuse.attention import IMPLS, AttentionConfig
from mmfuse.encoders.vgg import VGG
from mmfuse.encoders.vision import PositionalEmbedding2d, feature_map_to_tokens, tokens_to_feature_map
from mmfuse.io import dataclass_from_dict
from mmfuse.layers.common import FeedForward, check_mask, check_tokens, init_linear, trust_inputs
from mmfuse.layers.cross_attention import CrossAttention
from mmfuse.models.base import PretrainedModel

__all__ = ["VGGCrossAttention", "VGGCrossAttentionConfig"]

log = logging.getLogger(__name__)

MODEL_TYPE = "vgg_cross_attention"
ATTENTION_LEVELS = (2, 3, 4, 5)


@dataclass
class VGGCrossAttentionConfig:
    """Everything needed to rebuild a :class:`VGGCrossAttention`; saved as ``config.json``.

    ``dropout`` is the classifier MLP's; ``attn_dropout`` drops attention probabilities and the
    attention output before it joins the residual stream (the source's "dropout after attention").
    ``hidden_dim`` is the classifier MLP's hidden width (default: the last block's channels).
    ``impl`` and the options after it make the :class:`~mmfuse.attention.AttentionConfig` of every
    cross-attention level (:attr:`attention`); ``lowrank`` needs ``max_context_tokens``, the longest
    context, which the model cannot know from its own inputs.
    ``residual``: how each level's attention joins the map (see :class:`_LevelCrossAttention`).
    ``mlp_ratio``: > 0 adds a position-wise MLP (``mlp_ratio`` x channels hidden units) after each level's
    attention, joined the same way: a transformer block instead of the seeds' attention-only level.
    ``head``: ``"mean"`` averages the last map over positions before the MLP; ``"flatten"`` feeds the MLP
    the whole map, flattened (VGG's own classifier: it keeps which feature is where, so it can combine
    what the attention marked at one position with what the map holds there). The flattened map is
    first average-pooled to the grid of ``image_size``, so other image sizes still fit.
    """

    num_classes: int
    depth: Literal[11, 16] = 16
    batch_norm: bool = False
    width: float = 1.0
    context_dim: int | None = None
    num_heads: int = 8
    levels: tuple[int, ...] = (5,)
    dropout: float = 0.5
    attn_dropout: float = 0.1
    impl: Literal["auto", "math", "chunked", "local", "lowrank"] = "auto"
    image_size: int = 224
    hidden_dim: int | None = None
    window: int | None = None
    num_global: int | None = None
    block_q: int | None = None
    block_k: int | None = None
    rank: int | None = None
    max_context_tokens: int | None = None
    head: Literal["mean", "flatten"] = "mean"
    residual: Literal["norm", "gate"] = "norm"
    mlp_ratio: float = 0.0

    def __post_init__(self) -> None:
        self.levels = tuple(self.levels)
        if self.num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {self.num_classes}")
        if self.depth not in (11, 16):
            raise ValueError(f"depth must be 11 or 16, got {self.depth!r}")
        if self.width <= 0:
            raise ValueError(f"width must be positive, got {self.width}")
        if self.context_dim is not None and self.context_dim < 1:
            raise ValueError(f"context_dim must be None or >= 1, got {self.context_dim}")
        if self.num_heads < 1:
            raise ValueError(f"num_heads must be >= 1, got {self.num_heads}")
        if (not self.levels or len(set(self.levels)) != len(self.levels)
                or not set(self.levels) <= set(ATTENTION_LEVELS)):
            raise ValueError(
                f"levels must be distinct blocks of {ATTENTION_LEVELS} (at least one), got {self.levels}"
            )
        for name in ("dropout", "attn_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.impl not in IMPLS:
            raise ValueError(f"impl must be one of {IMPLS}, got {self.impl!r}")
        self.attention  # noqa: B018 - raises for options impl does not take
        if self.impl == "lowrank" and self.context_dim is not None and self.max_context_tokens is None:
            raise ValueError("impl='lowrank' needs max_context_tokens (the longest context) to size its projections")
        if self.image_size < 32:
            raise ValueError(f"image_size must be >= 32 (5 VGG blocks halve it), got {self.image_size}")
        if self.hidden_dim is not None and self.hidden_dim < 1:
            raise ValueError(f"hidden_dim must be None or >= 1, got {self.hidden_dim}")
        if self.residual not in ("norm", "gate"):
            raise ValueError(f"residual must be 'norm' or 'gate', got {self.residual!r}")
        if self.head not in ("mean", "flatten"):
            raise ValueError(f"head must be 'mean' or 'flatten', got {self.head!r}")
        if not 0 <= self.mlp_ratio <= 64:
            raise ValueError(f"mlp_ratio must be in [0, 64] (0: no MLP), got {self.mlp_ratio}")

    @property
    def attention(self) -> AttentionConfig:
        """The attention configuration of the cross-attention levels."""
        return AttentionConfig(self.impl, window=self.window, num_global=self.num_global, block_q=self.block_q,
                               block_k=self.block_k, rank=self.rank, max_len=self.max_context_tokens)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["levels"] = list(self.levels)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VGGCrossAttentionConfig:
        d = dict(d)
        if d.pop("model_type", MODEL_TYPE) != MODEL_TYPE:
            raise ValueError(f"not a {MODEL_TYPE} config")
        return dataclass_from_dict(cls, d, "VGGCrossAttentionConfig fields")


class _LevelCrossAttention(nn.Module):
    """Feature map -> tokens -> cross-attention to the context -> residual -> feature map.

    ``residual="norm"``: ``norm(x + attn(x))`` (post-norm). ``residual="gate"``: ``x + tanh(g) * attn(norm(x))``
    with ``g`` starting at 0 (Flamingo's gated cross-attention): the level starts as the identity, so the
    convolutions after it see the plain VGG's features until the gate opens, and no LayerNorm rescales
    the map they convolve.

    The positional embedding goes into the queries only: the map handed to the next block carries no
    additive position bias, and the attention knows where each query sits.

    With ``mlp_ratio`` > 0 a position-wise MLP follows, joined the same way (``norm2(x + mlp(x))`` or
    ``x + tanh(g2) * mlp(norm2(x))``). Without it what the attention brings each position is only added
    to the map: the classifier would have to combine "this position matches the context" with "this
    position holds a circle" itself; the MLP can do it at every position.
    """

    def __init__(self, dim: int, context_dim: int, grid: tuple[int, int], *, num_heads: int,
                 attn_dropout: float, impl: AttentionConfig, residual: str = "norm", mlp_ratio: float = 0.0) -> None:
        super().__init__()
        self.pos_embed = PositionalEmbedding2d(dim, grid)
        self.attn = CrossAttention(dim, context_dim, num_heads=num_heads, dropout=attn_dropout, impl=impl)
        self.drop = nn.Dropout(attn_dropout)
        self.norm = nn.LayerNorm(dim)
        self.gate = nn.Parameter(torch.zeros(())) if residual == "gate" else None
        self.mlp = FeedForward(dim, mlp_ratio=mlp_ratio, dropout=attn_dropout) if mlp_ratio else None
        self.norm2 = nn.LayerNorm(dim) if mlp_ratio else None
        self.gate2 = nn.Parameter(torch.zeros(())) if mlp_ratio and residual == "gate" else None

    def init_weights(self) -> None:
        self.pos_embed.init_weights()
        self.attn.init_weights()
        self.norm.reset_parameters()
        for gate in (self.gate, self.gate2):
            if gate is not None:
                nn.init.zeros_(gate)
        if self.mlp is not None:
            self.mlp.init_weights()
            self.norm2.reset_parameters()

    def forward(self, feat: Tensor, context: Tensor, *, context_mask: Tensor | None,
                need_weights: bool) -> tuple[Tensor, Tensor | None]:
        h, w = feat.shape[-2:]
        tokens = feature_map_to_tokens(feat)  # (B, h*w, C)
        queries = tokens if self.gate is None else self.norm(tokens)
        out, weights = self.attn(queries + self.pos_embed(h, w), context, context_mask=context_mask,
                                 need_weights=need_weights)  # (B, h*w, C), (B, heads, h*w, Nc)
        if self.gate is None:
            tokens = self.norm(tokens + self.drop(out))
        else:
            tokens = tokens + torch.tanh(self.gate) * self.drop(out)
        if self.mlp is not None:
            if self.gate2 is None:
                tokens = self.norm2(tokens + self.mlp(tokens))
            else:
                tokens = tokens + torch.tanh(self.gate2) * self.mlp(self.norm2(tokens))
        return tokens_to_feature_map(tokens, h, w), weights  # (B, C, h, w)


class VGGCrossAttention(PretrainedModel):
    """VGG (11 or 16) whose feature maps cross-attend to context tokens after the blocks in ``levels``.

    Args mirror :class:`VGGCrossAttentionConfig`; ``impl`` may also be an
    :class:`~mmfuse.attention.AttentionConfig`, which sets the options after it. ``context_dim=None``
    builds a plain VGG classifier (no attention layers); it then refuses a context rather than silently
    ignoring it.
    """

    model_type = MODEL_TYPE
    config_class = VGGCrossAttentionConfig

    def __init__(self, num_classes: int, *, depth: Literal[11, 16] = 16, batch_norm: bool = False,
                 width: float = 1.0, context_dim: int | None = None, num_heads: int = 8,
                 levels: tuple[int, ...] = (5,), dropout: float = 0.5, attn_dropout: float = 0.1,
                 impl: str | AttentionConfig = "auto", image_size: int = 224, hidden_dim: int | None = None,
                 window: int | None = None, num_global: int | None = None, block_q: int | None = None,
                 block_k: int | None = None, rank: int | None = None, max_context_tokens: int | None = None,
                 head: Literal["mean", "flatten"] = "mean", residual: Literal["norm", "gate"] = "norm",
                 mlp_ratio: float = 0.0) -> None:
        super().__init__()
        attention = {"window": window, "num_global": num_global, "block_q": block_q, "block_k": block_k,
                     "rank": rank, "max_context_tokens": max_context_tokens}
        if isinstance(impl, AttentionConfig):
            given = {k: v for k, v in impl.to_dict().items() if k != "impl"}
            given["max_context_tokens"] = given.pop("max_len", None)
            attention.update({k: v for k, v in given.items() if v is not None})
            impl = impl.impl
        cfg = VGGCrossAttentionConfig(
            num_classes=num_classes, depth=depth, batch_norm=batch_norm, width=width,
            context_dim=context_dim, num_heads=num_heads, levels=levels, dropout=dropout,
            attn_dropout=attn_dropout, impl=impl, image_size=image_size, hidden_dim=hidden_dim, **attention,
            head=head, residual=residual, mlp_ratio=mlp_ratio,
        )
        self.config = cfg
        self.backbone = VGG(cfg.depth, batch_norm=cfg.batch_norm, width=cfg.width, pos_embed=False)

        # Keys are block numbers as strings (ModuleDict keys must be str).
        self.cross_attention = nn.ModuleDict()
        if cfg.context_dim is not None:
            single = [lv for lv in sorted(cfg.levels) if self.backbone.grid(cfg.image_size, lv) == (1, 1)]
            if single:
                log.warning(
                    "VGG%d on %dx%d images has a 1x1 feature grid after block(s) %s: cross-attention there "
                    "has one query position (the image as a whole), so it cannot attend to where anything "
                    "is; use larger images or earlier levels", cfg.depth, cfg.image_size, cfg.image_size,
                    ", ".join(map(str, single)))
            for level in sorted(cfg.levels):
                dim = self.backbone.stage_channels[level - 1]
                if dim % cfg.num_heads:
                    raise ValueError(
                        f"block {level} has {dim} channels, not divisible by num_heads={cfg.num_heads}"
                    )
                self.cross_attention[str(level)] = _LevelCrossAttention(
                    dim, cfg.context_dim, self.backbone.grid(cfg.image_size, level),
                    num_heads=cfg.num_heads, attn_dropout=cfg.attn_dropout, impl=cfg.attention,
                    residual=cfg.residual, mlp_ratio=cfg.mlp_ratio,
                )

        trust_inputs(self.cross_attention)  # forward checks the context once, not at every level
        dim = self.backbone.out_dim
        hidden = cfg.hidden_dim or dim
        self.head_grid = self.backbone.grid(cfg.image_size) if cfg.head == "flatten" else (1, 1)
        self.head = nn.Sequential(
            nn.Linear(dim * self.head_grid[0] * self.head_grid[1], hidden), nn.ReLU(inplace=True),
            nn.Dropout(cfg.dropout),
            nn.Linear(hidden, cfg.num_classes),
        )
        self.init_weights()

    def init_weights(self) -> None:
        self.backbone.init_weights()
        for level in self.cross_attention.values():
            level.init_weights()
        for m in self.head:
            if isinstance(m, nn.Linear):
                init_linear(m)

    @classmethod
    def from_config(cls, config: VGGCrossAttentionConfig, directory: Path | None = None) -> VGGCrossAttention:
        return cls(**dataclasses.asdict(config))

    def attention_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters of the cross-attention layers (projections), for their own LR / L2 group."""
        for level in self.cross_attention.values():
            yield from level.attn.parameters()

    def _check_context(self, images: Tensor, context: Tensor, context_mask: Tensor | None) -> None:
        if self.config.context_dim is None:
            raise ValueError("this model was built with context_dim=None (no attention): pass context=None")
        # A single vector per sample is a context of one token: context[:, None].
        check_tokens(context, self.config.context_dim, "context", batch=images.shape[0], seq="Nc")
        check_mask(context_mask, context, "context_mask")

    def forward(self, images: Tensor, context: Tensor | None = None, *, context_mask: Tensor | None = None,
                need_weights: bool = False) -> Tensor | tuple[Tensor, dict[int, Tensor]]:
        """Logits (B, num_classes); with ``need_weights``, also {block: (B, heads, h*w, Nc) weights}."""
        if context is not None:
            self._check_context(images, context, context_mask)
        elif context_mask is not None:
            raise ValueError("context_mask given without context")
        self.backbone.check_images(images)

        weights: dict[int, Tensor] = {}
        x = images
        for level, block in enumerate(self.backbone.blocks, start=1):
            x = block(x)  # (B, C_l, h_l, w_l)
            if context is not None and str(level) in self.cross_attention:
                x, w = self.cross_attention[str(level)](x, context, context_mask=context_mask,
                                                        need_weights=need_weights)
                if w is not None:
                    weights[level] = w
        if self.config.head == "flatten":
            pooled = F.adaptive_avg_pool2d(x, self.head_grid).flatten(1)  # (B, C * h * w) at the config's grid
        else:
            pooled = x.mean(dim=(2, 3))  # mean over the h*w tokens -> (B, C)
        logits = self.head(pooled)  # (B, num_classes)
        return (logits, weights) if need_weights else logits
