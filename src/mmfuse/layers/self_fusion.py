"""Self-attention over the tokens of both modalities at once.

Shapes::

    B  batch   Ni  image tokens   Nt  text tokens   N = Ni + Nt   H  heads

    image_tokens: (B, Ni, image_dim)   image_mask: (B, Ni) bool, True = keep
    text_tokens:  (B, Nt, text_dim)    text_mask:  (B, Nt) bool, True = keep
    tokens: (B, N, dim), image tokens first   weights: (B, H, N, N)

Each modality is projected to ``dim`` (Linear + LayerNorm + Dropout) and tagged with a learned
modality-type embedding; then every token attends to every kept token of either modality, so the
weights show how much each token draws from each modality.

``impl`` is the attention implementation (a name or an :class:`~mmfuse.attention.AttentionConfig`);
``lowrank`` needs ``max_tokens``, the longest N = Ni + Nt, unless ``impl`` sets ``max_len`` itself.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mmfuse.attention import AttentionConfig
from mmfuse.layers.common import check_mask, check_tokens, concat_masks, init_linear, trust_inputs, zero_padding
from mmfuse.layers.cross_attention import AttentionBlock, apply_blocks

__all__ = ["ModalitySelfAttention", "ModalityTokens"]


class ModalityTokens(nn.Module):
    """Project both modalities to ``dim``, add modality-type embeddings, concatenate (image first).

    ``forward(image_tokens, text_tokens, *, image_mask=None, text_mask=None)`` returns
    ``(tokens (B, Ni + Nt, dim), mask (B, Ni + Nt) | None)``.
    """

    validate_inputs: bool = True

    def __init__(self, image_dim: int, text_dim: int, *, dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.image_dim = image_dim
        self.text_dim = text_dim
        self.image_proj = nn.Sequential(nn.Linear(image_dim, dim), nn.LayerNorm(dim), nn.Dropout(dropout))
        self.text_proj = nn.Sequential(nn.Linear(text_dim, dim), nn.LayerNorm(dim), nn.Dropout(dropout))
        self.modality_embed = nn.Parameter(torch.empty(2, dim))  # row 0: image, row 1: text
        self.init_weights()

    def init_weights(self) -> None:
        init_linear(self.image_proj[0])
        init_linear(self.text_proj[0])
        nn.init.trunc_normal_(self.modality_embed, std=0.02)

    def forward(self, image_tokens: Tensor, text_tokens: Tensor, *, image_mask: Tensor | None = None,
                text_mask: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        if self.validate_inputs:
            check_tokens(image_tokens, self.image_dim, "image_tokens", seq="Ni")
            check_tokens(text_tokens, self.text_dim, "text_tokens", batch=image_tokens.shape[0], seq="Nt")
            check_mask(image_mask, image_tokens, "image_mask")
            check_mask(text_mask, text_tokens, "text_mask")
            image_tokens, text_tokens = zero_padding(image_tokens, image_mask), zero_padding(text_tokens, text_mask)
        image = self.image_proj(image_tokens) + self.modality_embed[0]  # (B, Ni, dim)
        text = self.text_proj(text_tokens) + self.modality_embed[1]  # (B, Nt, dim)
        tokens = torch.cat([image, text], dim=1)  # (B, Ni + Nt, dim)
        return tokens, concat_masks([image_mask, text_mask], [image_tokens, text_tokens])


class ModalitySelfAttention(nn.Module):
    """:class:`ModalityTokens`, then ``depth`` pre-norm self-attention blocks and a final LayerNorm.

    Returns ``(tokens (B, Ni + Nt, dim), weights (B, H, N, N) of the last block | None)``.
    """

    def __init__(self, image_dim: int, text_dim: int, *, dim: int = 256, num_heads: int = 8, depth: int = 1,
                 mlp_ratio: float = 4.0, dropout: float = 0.1, impl: str | AttentionConfig = "auto",
                 max_tokens: int | None = None) -> None:
        super().__init__()
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        self.dim = dim
        self.embed = ModalityTokens(image_dim, text_dim, dim=dim, dropout=dropout)
        self.blocks = nn.ModuleList(
            AttentionBlock(dim, num_heads=num_heads, mlp_ratio=mlp_ratio, dropout=dropout, impl=impl,
                           max_tokens=max_tokens)
            for _ in range(depth)
        )
        trust_inputs(self.blocks)  # the embedding step checks the inputs
        self.norm = nn.LayerNorm(dim)

    def forward(self, image_tokens: Tensor, text_tokens: Tensor, *, image_mask: Tensor | None = None,
                text_mask: Tensor | None = None, need_weights: bool = False) -> tuple[Tensor, Tensor | None]:
        x, mask = self.embed(image_tokens, text_tokens, image_mask=image_mask, text_mask=text_mask)
        x, weights = apply_blocks(self.blocks, x, mask=mask, need_weights=need_weights)
        return self.norm(x), weights
