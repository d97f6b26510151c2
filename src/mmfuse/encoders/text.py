"""A small transformer text encoder over a word-level vocabulary built from the training questions.

Shapes::

    B  questions    L  tokens (``<cls>`` first, then words, then padding)    C  ``dim``

    ids: (B, L) int64     mask: (B, L) bool, True = real token     out: (B, L, C)

For pretrained encoders see :class:`mmfuse.encoders.hf.HFTextEncoder`; both share this interface
(``tokenize``, ``forward(ids, mask)``, ``out_dim``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from mmfuse.attention import AttentionConfig
from mmfuse.encoders.tokenizer import WordTokenizer
from mmfuse.layers.common import trust_inputs
from mmfuse.layers.cross_attention import AttentionBlock, apply_blocks

__all__ = ["TransformerTextEncoder"]


class TransformerTextEncoder(nn.Module):
    """Word embeddings + learned positions + ``depth`` pre-norm self-attention blocks + LayerNorm.

    ``depth=0`` gives bag-of-embeddings-with-positions, enough when the fusion itself attends.
    ``impl`` is the attention implementation (a name or an :class:`~mmfuse.attention.AttentionConfig`);
    ``lowrank``'s projections cover ``max_length`` tokens.
    """

    def __init__(self, tokenizer: WordTokenizer, *, dim: int = 128, depth: int = 1, num_heads: int = 4,
                 max_length: int = 32, dropout: float = 0.1, impl: str | AttentionConfig = "auto") -> None:
        super().__init__()
        if depth < 0:
            raise ValueError(f"depth must be >= 0, got {depth}")
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.out_dim = dim
        self.embed = nn.Embedding(len(tokenizer), dim, padding_idx=0)
        self.pos = nn.Parameter(torch.empty(max_length, dim))
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(
            AttentionBlock(dim, num_heads=num_heads, dropout=dropout, impl=impl, max_tokens=max_length)
            for _ in range(depth)
        )
        trust_inputs(self.blocks)  # forward checks ids and mask once
        self.norm = nn.LayerNorm(dim)
        self.init_weights()

    def init_weights(self) -> None:
        nn.init.trunc_normal_(self.embed.weight, std=0.02)
        with torch.no_grad():
            self.embed.weight[0].zero_()
        nn.init.trunc_normal_(self.pos, std=0.02)

    def tokenize(self, texts: Sequence[str]) -> tuple[Tensor, Tensor]:
        """Questions -> ``(ids (N, L), mask (N, L))``, truncated to ``max_length`` with a warning."""
        return self.tokenizer.encode(list(texts), max_length=self.max_length)

    def forward(self, ids: Tensor, mask: Tensor) -> Tensor:
        if ids.dim() != 2 or tuple(mask.shape) != tuple(ids.shape):
            raise ValueError(f"ids and mask must both be (B, L), got {tuple(ids.shape)} and {tuple(mask.shape)}")
        if mask.dtype != torch.bool:
            raise ValueError(f"mask must be a bool tensor (True = real token), got dtype {mask.dtype}")
        L = ids.shape[1]
        if L > self.max_length:
            raise ValueError(f"ids have {L} tokens, more than max_length={self.max_length}")
        x = self.drop(self.embed(ids) + self.pos[:L])  # (B, L, C)
        x, _ = apply_blocks(self.blocks, x, mask=mask)
        return self.norm(x)
