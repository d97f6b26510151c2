"""Co-attention: the text stream reads the image tokens at every block of a small transformer.

Shapes::

    B  batch   Nt  text tokens   Ni  image tokens   H  heads

    text_tokens: (B, Nt, text_dim)     text_mask:  (B, Nt) bool, True = keep
    image_tokens: (B, Ni, image_dim)   image_mask: (B, Ni) bool, True = keep
    tokens: (B, Nt, dim)               weights: (B, H, Nt, Ni), text -> image, of the last block

Each of the ``depth`` co-attention blocks: text self-attention (text mask), cross-attention of the
text over the image tokens (image mask), feed-forward; all pre-norm and residual. A final LayerNorm
closes the stack. With ``image_index`` (B,), ``image_tokens`` holds one row per image
(I, Ni, image_dim) shared by the text rows that index it (see :class:`~mmfuse.layers.CrossAttention`).

The ``fusion_transformer`` fusion (:class:`mmfuse.fusion.FusionTransformer`) is this layer with a
pooled output.
"""

from __future__ import annotations

from torch import Tensor, nn

from mmfuse.attention import AttentionConfig
from mmfuse.layers.common import (
    check_context_index,
    check_mask,
    check_tokens,
    init_linear,
    trust_inputs,
    zero_padding,
)
from mmfuse.layers.cross_attention import AttentionBlock, apply_blocks

__all__ = ["CoAttention"]


class CoAttention(nn.Module):
    """Text tokens updated by ``depth`` co-attention blocks over the (projected) image tokens.

    ``impl`` is the attention implementation (a name or an :class:`~mmfuse.attention.AttentionConfig`);
    ``lowrank`` needs ``max_text_tokens`` and ``max_image_tokens``, the longest sequences the text
    self-attention and the cross-attention attend over. ``null_key``: the cross-attentions may attend to a
    learned null token instead of the image (:class:`~mmfuse.layers.CrossAttention`).
    """

    validate_inputs: bool = True

    def __init__(self, text_dim: int, image_dim: int, *, dim: int = 256, num_heads: int = 8, depth: int = 2,
                 mlp_ratio: float = 4.0, dropout: float = 0.1, impl: str | AttentionConfig = "auto",
                 max_text_tokens: int | None = None, max_image_tokens: int | None = None,
                 null_key: bool = False) -> None:
        super().__init__()
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        self.text_dim = text_dim
        self.image_dim = image_dim
        self.dim = dim
        self.text_proj = nn.Linear(text_dim, dim)
        self.image_proj = nn.Linear(image_dim, dim)
        self.blocks = nn.ModuleList(
            AttentionBlock(dim, context_dim=dim, num_heads=num_heads, mlp_ratio=mlp_ratio, dropout=dropout,
                           impl=impl, max_tokens=max_text_tokens, max_context_tokens=max_image_tokens,
                           null_key=null_key)
            for _ in range(depth)
        )
        trust_inputs(self.blocks)
        self.norm = nn.LayerNorm(dim)
        self.init_weights()

    def init_weights(self) -> None:
        init_linear(self.text_proj)
        init_linear(self.image_proj)

    def forward(self, text_tokens: Tensor, image_tokens: Tensor, *, text_mask: Tensor | None = None,
                image_mask: Tensor | None = None, image_index: Tensor | None = None,
                need_weights: bool = False) -> tuple[Tensor, Tensor | None]:
        if self.validate_inputs:
            check_tokens(text_tokens, self.text_dim, "text_tokens", seq="Nt")
            check_tokens(image_tokens, self.image_dim, "image_tokens",
                         batch=None if image_index is not None else text_tokens.shape[0], seq="Ni")
            check_mask(text_mask, text_tokens, "text_mask")
            check_mask(image_mask, image_tokens, "image_mask")
            if image_index is not None:
                check_context_index(image_index, text_tokens.shape[0], image_tokens.shape[0])
            text_tokens, image_tokens = zero_padding(text_tokens, text_mask), zero_padding(image_tokens, image_mask)
        text = self.text_proj(text_tokens)  # (B, Nt, dim)
        image = self.image_proj(image_tokens)  # (B, Ni, dim)
        text, weights = apply_blocks(self.blocks, text, image, mask=text_mask, context_mask=image_mask,
                                     context_index=image_index, need_weights=need_weights)
        return self.norm(text), weights
