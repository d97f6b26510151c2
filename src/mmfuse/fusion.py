"""Fusion of image tokens and text tokens, chosen by name: the registry the models, CLI and ablation share.

Every fusion is called the same way::

    out = fusion(image_tokens, text_tokens, *, image_mask=None, text_mask=None, image_index=None,
                 need_weights=False)

    image_tokens: (B, Ni, image_dim)   image_mask: (B, Ni) bool, True = keep
    text_tokens:  (B, Nt, text_dim)    text_mask:  (B, Nt) bool, True = keep
    out.pooled: (B, fusion.out_dim)    out.tokens: (B, N, out_dim) | None    out.attention: see below

Shared images: with ``image_index`` (B,), ``image_tokens`` and ``image_mask`` hold one row per image
(I, Ni, ...) and text row b is about image ``image_index[b]``. The result equals gathering
``image_tokens[image_index]`` first, but each fusion does its per-image work (pooling, key/value
projections) once per image: in VQA about ten questions share an image.

``out.attention`` (only with ``need_weights=True``, else None) holds the weights of the fusion's main
cross-modal attention, from its last block; H = num_heads. Each fusion class declares its layout in
``attention_layout`` (what reports and attention maps read):

- ``TEXT_TO_IMAGE`` (B, H, Nt, Ni): ``cross_attention``, ``gated_cross_attention`` (last gated block),
  ``fusion_transformer`` (last co-attention block);
- ``LATENTS_TO_TOKENS`` (B, H, Q, Ni + Nt), latents over [image tokens; text tokens]: ``attention_pooling``;
- ``TOKENS_TO_TOKENS`` (B, H, Ni + Nt, Ni + Nt), [image; text] over itself: ``self_attention``;
- ``HOPS_TO_IMAGE`` (B, H, hops, Ni), one row per attention hop of the whole question: ``multi_hop``;
- None: ``concat``, ``late``, ``product``, ``text_only``, ``image_only``, which have no attention.

``create(name, image_dim=..., text_dim=..., dim=..., ...)`` passes each fusion the common arguments
it uses (``dim, num_heads, depth, dropout, impl, max_image_tokens, max_text_tokens``) and ignores the
rest; any other keyword argument must be one the fusion declares, else ``TypeError``. ``impl`` is an
attention implementation name or an :class:`~mmfuse.attention.AttentionConfig`; ``max_image_tokens``
and ``max_text_tokens`` (the longest inputs) size ``lowrank``'s projections, which is the only
implementation that needs them.

A fusion checks its inputs once, in :meth:`Fusion.check_inputs` at the top of its forward; the
layers inside it do not check again (see :func:`mmfuse.layers.common.trust_inputs`).

Padded tokens never matter: before any fusion's forward runs, :class:`Fusion` replaces the tokens
its masks pad by zeros (a selection), so NaN or Inf there change neither the outputs nor any
gradient. An empty sequence (Ni = 0 or Nt = 0, with or without a mask) is accepted: it pools to
zeros and sends no attention message, exactly as a sequence whose every token is masked; a batch
of 0 samples gives empty outputs.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from mmfuse.attention import AttentionConfig
from mmfuse.layers.attention_pool import AttentionPooling
from mmfuse.layers.co_attention import CoAttention
from mmfuse.layers.common import (
    check_context_index,
    check_mask,
    check_tokens,
    concat_masks,
    gather_rows,
    init_linear,
    masked_mean,
    trust_inputs,
    zero_padding,
)
from mmfuse.layers.cross_attention import AttentionBlock, apply_blocks
from mmfuse.layers.gated import GatedCrossAttention
from mmfuse.layers.relational import FiLMReadout, MultiHopReader, RelationalTransformer, RelationNetwork
from mmfuse.layers.self_fusion import ModalitySelfAttention, ModalityTokens

__all__ = [
    "HOPS_TO_IMAGE",
    "LATENTS_TO_TOKENS",
    "TEXT_TO_IMAGE",
    "TOKENS_TO_TOKENS",
    "Fusion",
    "FusionOutput",
    "FusionTransformer",
    "available",
    "create",
    "get",
    "per_question",
    "register",
]

# Layouts of FusionOutput.attention (see the module docstring), declared by each fusion class.
TEXT_TO_IMAGE = "text->image"
LATENTS_TO_TOKENS = "latents->image+text"
TOKENS_TO_TOKENS = "image+text->image+text"
HOPS_TO_IMAGE = "hops->image"


@dataclass
class FusionOutput:
    """``pooled`` (B, D) feeds the answer head; ``tokens`` (B, N, D) and ``attention`` may be None."""

    pooled: Tensor
    tokens: Tensor | None = None
    attention: Tensor | None = None


_REGISTRY: dict[str, type[Fusion]] = {}


def register(name: str) -> Callable[[type[Fusion]], type[Fusion]]:
    """Class decorator: make a :class:`Fusion` available to :func:`create` under ``name``."""

    def wrap(cls: type[Fusion]) -> type[Fusion]:
        if name in _REGISTRY:
            raise ValueError(f"fusion {name!r} is already registered (by {_REGISTRY[name].__name__})")
        _REGISTRY[name] = cls
        return cls

    return wrap


def available() -> list[str]:
    """Names accepted by :func:`create`, sorted."""
    return sorted(_REGISTRY)


def get(name: str) -> type[Fusion]:
    """The fusion class registered as ``name`` (e.g. to read its ``attention_layout``)."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown fusion {name!r}; choose one of {available()}")
    return _REGISTRY[name]


def create(name: str, *, image_dim: int, text_dim: int, dim: int = 256, num_heads: int = 8, depth: int = 1,
           dropout: float = 0.1, impl: str | AttentionConfig = "auto", max_image_tokens: int | None = None,
           max_text_tokens: int | None = None, **kwargs) -> Fusion:
    """Build the fusion registered as ``name``; see the module docstring for the arguments."""
    cls = get(name)
    accepted = inspect.signature(cls).parameters
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise TypeError(f"fusion {name!r} got unexpected arguments {unknown}; it accepts {sorted(accepted)}")
    config = AttentionConfig.coerce(impl)
    if ("max_image_tokens" in accepted and config.impl == "lowrank" and config.max_len is None
            and (max_image_tokens is None or max_text_tokens is None)):
        raise ValueError(f"fusion {name!r} with impl='lowrank' needs max_image_tokens= and max_text_tokens= "
                         "(the longest inputs), which size the low-rank projections")
    common = {"dim": dim, "num_heads": num_heads, "depth": depth, "dropout": dropout, "impl": config,
              "max_image_tokens": max_image_tokens, "max_text_tokens": max_text_tokens}
    common = {k: v for k, v in common.items() if k in accepted}
    return cls(image_dim=image_dim, text_dim=text_dim, **common, **kwargs)


def _total(*lengths: int | None) -> int | None:
    """Length of concatenated sequences, None if any is unknown."""
    return None if any(n is None for n in lengths) else sum(lengths)


def _zero_padded_inputs(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Forward pre-hook of every fusion: padded image and text tokens become zeros before forward runs.

    Done here, once, so that every fusion, registered now or later, is safe whatever it does with
    padded positions (a mask product, a mean over all tokens). Inputs whose mask does not fit are
    left for ``check_inputs`` to report.
    """
    args = list(args)
    for i, (name, mask_name) in enumerate((("image_tokens", "image_mask"), ("text_tokens", "text_mask"))):
        mask = kwargs.get(mask_name)
        x = args[i] if i < len(args) else kwargs.get(name)
        if not (isinstance(mask, Tensor) and isinstance(x, Tensor) and mask.dtype == torch.bool
                and x.dim() == 3 and mask.shape == x.shape[:2]):
            continue
        if i < len(args):
            args[i] = zero_padding(x, mask)
        else:
            kwargs[name] = zero_padding(x, mask)
    return tuple(args), kwargs


class Fusion(nn.Module):
    """Base of every fusion: remembers the input widths and ``out_dim``, checks the inputs.

    ``attention_layout`` says what ``FusionOutput.attention`` holds (module docstring); None for a
    fusion without attention. Padded tokens reach ``forward`` as zeros (module docstring).
    """

    attention_layout: ClassVar[str | None] = None

    def __init__(self, *, image_dim: int, text_dim: int, out_dim: int) -> None:
        super().__init__()
        self.image_dim = image_dim
        self.text_dim = text_dim
        self.out_dim = out_dim
        self.register_forward_pre_hook(_zero_padded_inputs, with_kwargs=True)

    def check_inputs(self, image_tokens: Tensor, text_tokens: Tensor, image_mask: Tensor | None,
                     text_mask: Tensor | None, image_index: Tensor | None = None) -> None:
        check_tokens(image_tokens, self.image_dim, "image_tokens", seq="Ni")
        if image_index is None:
            check_tokens(text_tokens, self.text_dim, "text_tokens", batch=image_tokens.shape[0], seq="Nt")
        else:
            check_tokens(text_tokens, self.text_dim, "text_tokens", seq="Nt")
            check_context_index(image_index, text_tokens.shape[0], image_tokens.shape[0])
        check_mask(image_mask, image_tokens, "image_mask")
        check_mask(text_mask, text_tokens, "text_mask")


def per_question(x: Tensor | None, image_index: Tensor | None) -> Tensor | None:
    """Rows of a per-image tensor (I, ...) for each question (B, ...); unchanged without an index."""
    return x if x is None or image_index is None else gather_rows(x, image_index)


def _mlp(in_dim: int, dim: int, dropout: float) -> nn.Sequential:
    mlp = nn.Sequential(nn.Linear(in_dim, dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(dim, dim))
    init_linear(mlp[0])
    init_linear(mlp[3])
    return mlp


# --- Baselines on pooled vectors: each modality is masked-mean-pooled before it meets the other. ---


@register("concat")
class ConcatFusion(Fusion):
    """``act(Linear([mean(image); mean(text)]))``: MMF's ConcatBERT, without attention."""

    def __init__(self, *, image_dim: int, text_dim: int, dim: int = 256, dropout: float = 0.1) -> None:
        super().__init__(image_dim=image_dim, text_dim=text_dim, out_dim=dim)
        self.proj = nn.Linear(image_dim + text_dim, dim)
        self.act = nn.GELU()
        self.drop = nn.Dropout(dropout)
        init_linear(self.proj)

    def forward(self, image_tokens: Tensor, text_tokens: Tensor, *, image_mask: Tensor | None = None,
                text_mask: Tensor | None = None, image_index: Tensor | None = None,
                need_weights: bool = False) -> FusionOutput:
        self.check_inputs(image_tokens, text_tokens, image_mask, text_mask, image_index)
        image = per_question(masked_mean(image_tokens, image_mask), image_index)  # (B, image_dim)
        both = torch.cat([image, masked_mean(text_tokens, text_mask)], dim=-1)
        return FusionOutput(self.drop(self.act(self.proj(both))))  # (B, dim)


@register("late")
class LateFusion(Fusion):
    """Two unimodal MLP heads, ``pooled = (head_image(mean(image)) + head_text(mean(text))) / 2``.

    A linear classifier ``W pooled + b`` is then exactly the average of the two unimodal heads'
    logits ``W head + b``: late fusion with a shared classifier. The heads are those of
    ``image_only`` and ``text_only``.
    """

    def __init__(self, *, image_dim: int, text_dim: int, dim: int = 256, dropout: float = 0.1) -> None:
        super().__init__(image_dim=image_dim, text_dim=text_dim, out_dim=dim)
        self.image_head = _mlp(image_dim, dim, dropout)
        self.text_head = _mlp(text_dim, dim, dropout)

    def forward(self, image_tokens: Tensor, text_tokens: Tensor, *, image_mask: Tensor | None = None,
                text_mask: Tensor | None = None, image_index: Tensor | None = None,
                need_weights: bool = False) -> FusionOutput:
        self.check_inputs(image_tokens, text_tokens, image_mask, text_mask, image_index)
        image = per_question(self.image_head(masked_mean(image_tokens, image_mask)), image_index)  # (B, dim)
        text = self.text_head(masked_mean(text_tokens, text_mask))  # (B, dim)
        return FusionOutput((image + text) / 2)


@register("product")
class ProductFusion(Fusion):
    """``tanh(Linear(mean(image))) * tanh(Linear(mean(text)))``: the easy-VQA reference model's fusion."""

    def __init__(self, *, image_dim: int, text_dim: int, dim: int = 256, dropout: float = 0.1) -> None:
        super().__init__(image_dim=image_dim, text_dim=text_dim, out_dim=dim)
        self.image_proj = nn.Linear(image_dim, dim)
        self.text_proj = nn.Linear(text_dim, dim)
        self.drop = nn.Dropout(dropout)
        init_linear(self.image_proj)
        init_linear(self.text_proj)

    def forward(self, image_tokens: Tensor, text_tokens: Tensor, *, image_mask: Tensor | None = None,
                text_mask: Tensor | None = None, image_index: Tensor | None = None,
                need_weights: bool = False) -> FusionOutput:
        self.check_inputs(image_tokens, text_tokens, image_mask, text_mask, image_index)
        image = torch.tanh(self.image_proj(masked_mean(image_tokens, image_mask)))  # (I, dim)
        image = per_question(image, image_index)  # (B, dim)
        text = torch.tanh(self.text_proj(masked_mean(text_tokens, text_mask)))  # (B, dim)
        return FusionOutput(self.drop(image * text))


@register("text_only")
class TextOnlyFusion(Fusion):
    """No fusion, for ablations: the text head of ``late``; the image is ignored."""

    def __init__(self, *, image_dim: int, text_dim: int, dim: int = 256, dropout: float = 0.1) -> None:
        super().__init__(image_dim=image_dim, text_dim=text_dim, out_dim=dim)
        self.text_head = _mlp(text_dim, dim, dropout)

    def forward(self, image_tokens: Tensor, text_tokens: Tensor, *, image_mask: Tensor | None = None,
                text_mask: Tensor | None = None, image_index: Tensor | None = None,
                need_weights: bool = False) -> FusionOutput:
        self.check_inputs(image_tokens, text_tokens, image_mask, text_mask, image_index)
        return FusionOutput(self.text_head(masked_mean(text_tokens, text_mask)))


@register("image_only")
class ImageOnlyFusion(Fusion):
    """No fusion, for ablations: the image head of ``late``; the question is ignored."""

    def __init__(self, *, image_dim: int, text_dim: int, dim: int = 256, dropout: float = 0.1) -> None:
        super().__init__(image_dim=image_dim, text_dim=text_dim, out_dim=dim)
        self.image_head = _mlp(image_dim, dim, dropout)

    def forward(self, image_tokens: Tensor, text_tokens: Tensor, *, image_mask: Tensor | None = None,
                text_mask: Tensor | None = None, image_index: Tensor | None = None,
                need_weights: bool = False) -> FusionOutput:
        self.check_inputs(image_tokens, text_tokens, image_mask, text_mask, image_index)
        return FusionOutput(per_question(self.image_head(masked_mean(image_tokens, image_mask)), image_index))


# --- Attention fusions: tokens of one modality attend over the tokens of the other. ---


@register("cross_attention")
class CrossAttentionFusion(Fusion):
    """Text tokens (projected to ``dim``) query the image tokens through ``depth`` pre-norm
    cross-attention + feed-forward blocks; final LayerNorm; pooled = masked mean of the text tokens."""

    attention_layout = TEXT_TO_IMAGE

    def __init__(self, *, image_dim: int, text_dim: int, dim: int = 256, num_heads: int = 8, depth: int = 1,
                 mlp_ratio: float = 4.0, dropout: float = 0.1, impl: str | AttentionConfig = "auto",
                 max_image_tokens: int | None = None, max_text_tokens: int | None = None) -> None:
        super().__init__(image_dim=image_dim, text_dim=text_dim, out_dim=dim)
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        self.text_proj = nn.Linear(text_dim, dim)
        self.blocks = nn.ModuleList(
            AttentionBlock(dim, context_dim=image_dim, self_attention=False, num_heads=num_heads,
                           mlp_ratio=mlp_ratio, dropout=dropout, impl=impl, max_context_tokens=max_image_tokens)
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim)
        init_linear(self.text_proj)
        trust_inputs(self.blocks)

    def forward(self, image_tokens: Tensor, text_tokens: Tensor, *, image_mask: Tensor | None = None,
                text_mask: Tensor | None = None, image_index: Tensor | None = None,
                need_weights: bool = False) -> FusionOutput:
        self.check_inputs(image_tokens, text_tokens, image_mask, text_mask, image_index)
        text, weights = apply_blocks(self.blocks, self.text_proj(text_tokens), image_tokens,
                                     context_mask=image_mask, context_index=image_index, need_weights=need_weights)
        text = self.norm(text)  # (B, Nt, dim)
        return FusionOutput(masked_mean(text, text_mask), text, weights)


@register("attention_pooling")
class AttentionPoolingFusion(Fusion):
    """``num_queries`` latents attend over [image tokens; text tokens] (each projected to ``dim`` and
    tagged with a modality-type embedding); pooled = mean of the latents, tokens = the latents."""

    attention_layout = LATENTS_TO_TOKENS

    def __init__(self, *, image_dim: int, text_dim: int, dim: int = 256, num_heads: int = 8, depth: int = 1,
                 num_queries: int = 32, mlp_ratio: float = 4.0, dropout: float = 0.1,
                 impl: str | AttentionConfig = "auto", max_image_tokens: int | None = None,
                 max_text_tokens: int | None = None) -> None:
        super().__init__(image_dim=image_dim, text_dim=text_dim, out_dim=dim)
        self.embed = ModalityTokens(image_dim, text_dim, dim=dim, dropout=dropout)
        self.pool = AttentionPooling(dim, num_queries=num_queries, num_heads=num_heads, depth=depth,
                                     mlp_ratio=mlp_ratio, dropout=dropout, impl=impl,
                                     max_tokens=_total(max_image_tokens, max_text_tokens))
        trust_inputs(self.embed, self.pool)

    def forward(self, image_tokens: Tensor, text_tokens: Tensor, *, image_mask: Tensor | None = None,
                text_mask: Tensor | None = None, image_index: Tensor | None = None,
                need_weights: bool = False) -> FusionOutput:
        self.check_inputs(image_tokens, text_tokens, image_mask, text_mask, image_index)
        image_tokens, image_mask = per_question(image_tokens, image_index), per_question(image_mask, image_index)
        tokens, mask = self.embed(image_tokens, text_tokens, image_mask=image_mask, text_mask=text_mask)
        latents, weights = self.pool(tokens, mask=mask, need_weights=need_weights)  # (B, Q, dim)
        return FusionOutput(latents.mean(dim=1), latents, weights)


@register("self_attention")
class SelfAttentionFusion(Fusion):
    """:class:`~mmfuse.layers.ModalitySelfAttention` over [image; text]; pooled = masked mean of all
    kept tokens of both modalities."""

    attention_layout = TOKENS_TO_TOKENS

    def __init__(self, *, image_dim: int, text_dim: int, dim: int = 256, num_heads: int = 8, depth: int = 1,
                 mlp_ratio: float = 4.0, dropout: float = 0.1, impl: str | AttentionConfig = "auto",
                 max_image_tokens: int | None = None, max_text_tokens: int | None = None) -> None:
        super().__init__(image_dim=image_dim, text_dim=text_dim, out_dim=dim)
        self.encoder = ModalitySelfAttention(image_dim, text_dim, dim=dim, num_heads=num_heads, depth=depth,
                                             mlp_ratio=mlp_ratio, dropout=dropout, impl=impl,
                                             max_tokens=_total(max_image_tokens, max_text_tokens))
        trust_inputs(self.encoder)

    def forward(self, image_tokens: Tensor, text_tokens: Tensor, *, image_mask: Tensor | None = None,
                text_mask: Tensor | None = None, image_index: Tensor | None = None,
                need_weights: bool = False) -> FusionOutput:
        self.check_inputs(image_tokens, text_tokens, image_mask, text_mask, image_index)
        image_tokens, image_mask = per_question(image_tokens, image_index), per_question(image_mask, image_index)
        tokens, weights = self.encoder(image_tokens, text_tokens, image_mask=image_mask, text_mask=text_mask,
                                       need_weights=need_weights)  # (B, Ni + Nt, dim)
        mask = concat_masks([image_mask, text_mask], [image_tokens, text_tokens])
        return FusionOutput(masked_mean(tokens, mask), tokens, weights)


@register("gated_cross_attention")
class GatedCrossAttentionFusion(Fusion):
    """``depth`` x (text self-attention block, :class:`~mmfuse.layers.GatedCrossAttention` over the
    image tokens); final LayerNorm; pooled = masked mean of the text tokens.

    The gates start closed, so at initialisation the output does not depend on the image at all;
    training opens them (Flamingo).
    """

    attention_layout = TEXT_TO_IMAGE

    def __init__(self, *, image_dim: int, text_dim: int, dim: int = 256, num_heads: int = 8, depth: int = 1,
                 mlp_ratio: float = 4.0, dropout: float = 0.1, impl: str | AttentionConfig = "auto",
                 max_image_tokens: int | None = None, max_text_tokens: int | None = None) -> None:
        super().__init__(image_dim=image_dim, text_dim=text_dim, out_dim=dim)
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        kwargs = {"num_heads": num_heads, "mlp_ratio": mlp_ratio, "dropout": dropout, "impl": impl}
        self.text_proj = nn.Linear(text_dim, dim)
        self.blocks = nn.ModuleList()
        for _ in range(depth):
            self.blocks.append(AttentionBlock(dim, max_tokens=max_text_tokens, **kwargs))
            self.blocks.append(GatedCrossAttention(dim, image_dim, max_context_tokens=max_image_tokens, **kwargs))
        self.norm = nn.LayerNorm(dim)
        init_linear(self.text_proj)
        trust_inputs(self.blocks)

    def forward(self, image_tokens: Tensor, text_tokens: Tensor, *, image_mask: Tensor | None = None,
                text_mask: Tensor | None = None, image_index: Tensor | None = None,
                need_weights: bool = False) -> FusionOutput:
        self.check_inputs(image_tokens, text_tokens, image_mask, text_mask, image_index)
        text, weights = apply_blocks(self.blocks, self.text_proj(text_tokens), image_tokens, mask=text_mask,
                                     context_mask=image_mask, context_index=image_index, need_weights=need_weights)
        text = self.norm(text)  # (B, Nt, dim)
        return FusionOutput(masked_mean(text, text_mask), text, weights)


@register("fusion_transformer")
class FusionTransformer(Fusion):
    """The text tokens through :class:`~mmfuse.layers.CoAttention` (``depth`` co-attention blocks over
    the image tokens); pooled = masked mean of the text tokens."""

    attention_layout = TEXT_TO_IMAGE

    def __init__(self, *, image_dim: int, text_dim: int, dim: int = 256, num_heads: int = 8, depth: int = 1,
                 mlp_ratio: float = 4.0, dropout: float = 0.1, impl: str | AttentionConfig = "auto",
                 max_image_tokens: int | None = None, max_text_tokens: int | None = None,
                 null_key: bool = False) -> None:
        super().__init__(image_dim=image_dim, text_dim=text_dim, out_dim=dim)
        self.encoder = CoAttention(text_dim, image_dim, dim=dim, num_heads=num_heads, depth=depth,
                                   mlp_ratio=mlp_ratio, dropout=dropout, impl=impl,
                                   max_text_tokens=max_text_tokens, max_image_tokens=max_image_tokens,
                                   null_key=null_key)
        trust_inputs(self.encoder)

    def forward(self, image_tokens: Tensor, text_tokens: Tensor, *, image_mask: Tensor | None = None,
                text_mask: Tensor | None = None, image_index: Tensor | None = None,
                need_weights: bool = False) -> FusionOutput:
        self.check_inputs(image_tokens, text_tokens, image_mask, text_mask, image_index)
        text, weights = self.encoder(text_tokens, image_tokens, text_mask=text_mask, image_mask=image_mask,
                                     image_index=image_index, need_weights=need_weights)  # (B, Nt, dim)
        return FusionOutput(masked_mean(text, text_mask), text, weights)


# --- Relational fusions (Sort-of-CLEVR): layers in mmfuse.layers.relational. ---


@register("relational_transformer")
class RelationalTransformerFusion(Fusion):
    """:class:`~mmfuse.layers.relational.RelationalTransformer`: coordinates and ``image_depth``
    self-attention blocks over the image tokens (once per image), then co-attention blocks for the
    text; pooled = masked mean of the text tokens. ``out.attention``: text -> image, (B, H, Nt, Ni).
    With ``question_query=True`` one token per question (the masked mean of its text tokens) takes the
    text tokens' place: Nt = 1, and far less work per question."""

    attention_layout = TEXT_TO_IMAGE

    def __init__(self, *, image_dim: int, text_dim: int, dim: int = 256, num_heads: int = 8, depth: int = 1,
                 image_depth: int = 2, coordinates: bool = True, question_query: bool = False,
                 mlp_ratio: float = 4.0, dropout: float = 0.1, impl: str | AttentionConfig = "auto",
                 max_image_tokens: int | None = None, max_text_tokens: int | None = None) -> None:
        super().__init__(image_dim=image_dim, text_dim=text_dim, out_dim=dim)
        self.encoder = RelationalTransformer(image_dim, text_dim, dim=dim, num_heads=num_heads, depth=depth,
                                             image_depth=image_depth, coordinates=coordinates,
                                             question_query=question_query, mlp_ratio=mlp_ratio,
                                             dropout=dropout, impl=impl, max_image_tokens=max_image_tokens,
                                             max_text_tokens=max_text_tokens)
        trust_inputs(self.encoder)

    def forward(self, image_tokens: Tensor, text_tokens: Tensor, *, image_mask: Tensor | None = None,
                text_mask: Tensor | None = None, image_index: Tensor | None = None,
                need_weights: bool = False) -> FusionOutput:
        self.check_inputs(image_tokens, text_tokens, image_mask, text_mask, image_index)
        text, weights = self.encoder(image_tokens, text_tokens, image_mask=image_mask, text_mask=text_mask,
                                     image_index=image_index, need_weights=need_weights)  # (B, Nt or 1, dim)
        return FusionOutput(masked_mean(text, None if self.encoder.question_query else text_mask), text, weights)


@register("multi_hop")
class MultiHopFusion(Fusion):
    """:class:`~mmfuse.layers.relational.MultiHopReader`: the question reads the image tokens in
    ``depth`` attention hops, each hop's query built from the question and the earlier reads (keys and
    values once per image); ``distance_bias`` lets hops 2+ score tokens by their squared distance from a
    position an earlier hop read. ``out.attention``: every hop's weights, (B, H, hops, Ni)."""

    attention_layout = HOPS_TO_IMAGE

    def __init__(self, *, image_dim: int, text_dim: int, dim: int = 256, num_heads: int = 8, depth: int = 2,
                 coordinates: bool = True, dropout: float = 0.1, count_unit: float | None = None,
                 distance_bias: bool = False) -> None:
        super().__init__(image_dim=image_dim, text_dim=text_dim, out_dim=dim)
        self.reader = MultiHopReader(image_dim, text_dim, dim=dim, num_heads=num_heads, hops=depth,
                                     coordinates=coordinates, dropout=dropout, count_unit=count_unit,
                                     distance_bias=distance_bias)
        trust_inputs(self.reader)

    def forward(self, image_tokens: Tensor, text_tokens: Tensor, *, image_mask: Tensor | None = None,
                text_mask: Tensor | None = None, image_index: Tensor | None = None,
                need_weights: bool = False) -> FusionOutput:
        self.check_inputs(image_tokens, text_tokens, image_mask, text_mask, image_index)
        pooled, weights = self.reader(image_tokens, text_tokens, image_mask=image_mask, text_mask=text_mask,
                                      image_index=image_index)  # (B, dim), (B, H, hops, Ni)
        return FusionOutput(pooled, None, weights if need_weights else None)


@register("relation_network")
class RelationNetworkFusion(Fusion):
    """Santoro et al.'s :class:`~mmfuse.layers.relational.RelationNetwork` over the image tokens, with
    the masked mean of the text tokens as the question; no attention (``out.attention`` is None).
    ``depth`` is the number of layers of the pairwise MLP g. Its cost grows with Ni^2 per question:
    use few image tokens (e.g. a 5 x 5 grid)."""

    def __init__(self, *, image_dim: int, text_dim: int, dim: int = 256, depth: int = 4,
                 coordinates: bool = True, dropout: float = 0.1) -> None:
        super().__init__(image_dim=image_dim, text_dim=text_dim, out_dim=dim)
        self.rn = RelationNetwork(image_dim, text_dim, dim=dim, g_layers=depth, coordinates=coordinates,
                                  dropout=dropout)
        trust_inputs(self.rn)

    def forward(self, image_tokens: Tensor, text_tokens: Tensor, *, image_mask: Tensor | None = None,
                text_mask: Tensor | None = None, image_index: Tensor | None = None,
                need_weights: bool = False) -> FusionOutput:
        self.check_inputs(image_tokens, text_tokens, image_mask, text_mask, image_index)
        pooled = self.rn(image_tokens, masked_mean(text_tokens, text_mask), object_mask=image_mask,
                         object_index=image_index)  # (B, dim)
        return FusionOutput(pooled)


@register("film")
class FiLMFusion(Fusion):
    """:class:`~mmfuse.layers.relational.FiLMReadout`: image tokens (coordinates, ``image_depth``
    self-attention blocks, once per image), then ``depth`` question-conditioned FiLM blocks per token
    and a max over the tokens; ``out.tokens`` are the modulated image tokens, no attention weights."""

    def __init__(self, *, image_dim: int, text_dim: int, dim: int = 256, num_heads: int = 8, depth: int = 2,
                 image_depth: int = 2, coordinates: bool = True, mlp_ratio: float = 4.0, dropout: float = 0.1,
                 impl: str | AttentionConfig = "auto", max_image_tokens: int | None = None, hops: int = 1) -> None:
        super().__init__(image_dim=image_dim, text_dim=text_dim, out_dim=dim)
        self.readout = FiLMReadout(image_dim, text_dim, dim=dim, depth=depth, image_depth=image_depth,
                                   coordinates=coordinates, num_heads=num_heads, mlp_ratio=mlp_ratio,
                                   dropout=dropout, impl=impl, max_image_tokens=max_image_tokens, hops=hops)
        trust_inputs(self.readout)

    def forward(self, image_tokens: Tensor, text_tokens: Tensor, *, image_mask: Tensor | None = None,
                text_mask: Tensor | None = None, image_index: Tensor | None = None,
                need_weights: bool = False) -> FusionOutput:
        self.check_inputs(image_tokens, text_tokens, image_mask, text_mask, image_index)
        pooled, tokens = self.readout(image_tokens, text_tokens, image_mask=image_mask, text_mask=text_mask,
                                      image_index=image_index)  # (B, dim), (B, Ni, dim)
        return FusionOutput(pooled, tokens)
