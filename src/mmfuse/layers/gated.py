"""Flamingo-style gated cross-attention: a block that starts as the identity.

Shapes::

    x: (B, Nq, dim)   context: (B, Nk, context_dim)   context_mask: (B, Nk) bool, True = keep
    out: (B, Nq, dim) weights: (B, H, Nq, Nk)

    x = x + tanh(alpha_attn) * cross_attention(LayerNorm(x), LayerNorm(context))
    x = x + tanh(alpha_ff)   * feed_forward(LayerNorm(x))

Both gates start at zero, so inserting the block into a trained text stack changes nothing until
the gates learn to open (Alayrac et al., 2022, "Flamingo").
"""

from __future__ import annotations

from mmfuse.attention import AttentionConfig
from mmfuse.layers.cross_attention import AttentionBlock

__all__ = ["GatedCrossAttention"]


class GatedCrossAttention(AttentionBlock):
    """Gated cross-attention + gated feed-forward; ``gate_cross`` and ``gate_ff`` are the alphas.

    Called as ``block(x, context, context_mask=None, need_weights=False) -> (x, weights | None)``
    (the forward of :class:`AttentionBlock`, whose ``mask`` has nothing to mask here).
    """

    def __init__(self, dim: int, context_dim: int, *, num_heads: int = 8, mlp_ratio: float = 4.0,
                 dropout: float = 0.0, impl: str | AttentionConfig = "auto",
                 max_context_tokens: int | None = None) -> None:
        super().__init__(dim, context_dim=context_dim, self_attention=False, gated=True, num_heads=num_heads,
                         mlp_ratio=mlp_ratio, dropout=dropout, impl=impl, max_context_tokens=max_context_tokens)

