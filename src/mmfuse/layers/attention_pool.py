"""Attention pooling: a fixed number of learned latent queries attend over a variable-length input.

Shapes::

    B  batch   N  input tokens (any number)   Q  latent queries (num_queries)   H  heads

    x: (B, N, input_dim)   mask: (B, N) bool, True = keep
    tokens: (B, Q, out_dim or input_dim)   weights: (B, H, Q, N)

A Perceiver-resampler stack (Jaegle et al., 2021; Alayrac et al., 2022): ``depth`` pre-norm blocks of
``latents = latents + cross_attention(LN(latents), LN(x)); latents = latents + ff(LN(latents))`` and
a final LayerNorm. The latents attend over the inputs only, not over ``[inputs; latents]`` as
Flamingo's resampler does: the weights are then a distribution over the input tokens (rows sum to 1
over the kept ones), which is what an attention map of the image needs.

``impl`` is the attention implementation (a name or an :class:`~mmfuse.attention.AttentionConfig`);
``lowrank`` needs ``max_tokens``, the longest input, unless ``impl`` sets ``max_len`` itself.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mmfuse.attention import AttentionConfig
from mmfuse.layers.common import check_mask, check_tokens, init_linear, trust_inputs, zero_padding
from mmfuse.layers.cross_attention import AttentionBlock, apply_blocks

__all__ = ["AttentionPooling"]


class AttentionPooling(nn.Module):
    """Pool ``(B, N, input_dim)`` into ``num_queries`` tokens with learned latent queries."""

    validate_inputs: bool = True

    def __init__(self, input_dim: int, *, num_queries: int = 32, num_heads: int = 8, depth: int = 1,
                 out_dim: int | None = None, mlp_ratio: float = 4.0, dropout: float = 0.0,
                 impl: str | AttentionConfig = "auto", max_tokens: int | None = None) -> None:
        super().__init__()
        if num_queries < 1 or depth < 1:
            raise ValueError(f"num_queries and depth must be >= 1, got {num_queries} and {depth}")
        self.input_dim = input_dim
        self.num_queries = num_queries
        self.out_dim = out_dim or input_dim
        self.latents = nn.Parameter(torch.empty(num_queries, input_dim))
        self.blocks = nn.ModuleList(
            AttentionBlock(input_dim, context_dim=input_dim, self_attention=False, num_heads=num_heads,
                           mlp_ratio=mlp_ratio, dropout=dropout, impl=impl, max_context_tokens=max_tokens)
            for _ in range(depth)
        )
        trust_inputs(self.blocks)
        self.norm = nn.LayerNorm(input_dim)
        self.proj = nn.Linear(input_dim, self.out_dim) if self.out_dim != input_dim else nn.Identity()
        self.init_weights()

    def init_weights(self) -> None:
        nn.init.trunc_normal_(self.latents, std=self.input_dim**-0.5)
        if isinstance(self.proj, nn.Linear):
            init_linear(self.proj)

    def forward(self, x: Tensor, *, mask: Tensor | None = None,
                need_weights: bool = False) -> tuple[Tensor, Tensor | None]:
        if self.validate_inputs:
            check_tokens(x, self.input_dim, "x")
            check_mask(mask, x, "mask")
            x = zero_padding(x, mask)
        latents = self.latents.expand(x.shape[0], -1, -1)  # (B, Q, input_dim)
        latents, weights = apply_blocks(self.blocks, latents, x, context_mask=mask, need_weights=need_weights)
        return self.proj(self.norm(latents)), weights  # (B, Q, out_dim)
