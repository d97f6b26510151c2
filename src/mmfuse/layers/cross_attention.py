"""Multi-head cross-attention, and the pre-norm transformer block every fusion layer is built from.

Shapes::

    B   batch          H   heads         Dh  head dimension (dim // H)
    Nq  queries        Nk  context tokens (keys / values)

    x: (B, Nq, query_dim)   context: (B, Nk, context_dim)   context_mask: (B, Nk) bool, True = keep
    out: (B, Nq, out_dim)   weights: (B, H, Nq, Nk), each row sums to 1 over the kept context tokens

Self-attention is ``CrossAttention(d, d)`` called as ``attn(x, x, context_mask=mask)``.

Shared contexts: with ``context_index`` (B,) the context holds one entry per *image* (I, Nk, ...) and
query row b attends over ``context[context_index[b]]``. Keys and values are then projected once per
image and gathered afterwards: in VQA about ten questions share an image, so this saves most of the
projection work of training.

Decoding: ``causal=True`` masks future tokens (self-attention of a decoder), and a
:class:`~mmfuse.attention.KVCache` keeps the keys and values of the tokens already decoded, so each step
feeds only the new tokens; a static cache holds a cross-attention's projected context.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mmfuse.attention import Attention, AttentionConfig, KVCache
from mmfuse.layers.common import (
    FeedForward,
    check_context_index,
    check_mask,
    check_tokens,
    gather_rows,
    init_linear,
    trust_inputs,
    zero_padding,
)

__all__ = ["AttentionBlock", "CrossAttention", "apply_blocks"]


class CrossAttention(nn.Module):
    """Queries from ``x`` attend over ``context``; the two may have different widths.

    ``dim`` is the total width of the attention (``num_heads`` heads of ``dim // num_heads``) and
    defaults to ``query_dim``. ``dropout`` drops attention probabilities in training, as
    ``torch.nn.MultiheadAttention`` does. ``impl`` is the attention implementation: a name or an
    :class:`~mmfuse.attention.AttentionConfig` (for ``lowrank`` one whose ``max_len`` covers the context).

    A sample whose context is entirely masked, or a context of no token (Nk = 0), gets an output of
    zeros (not ``out_proj.bias``): no context, no message, so a residual block adds nothing for it.
    Padded context tokens are replaced by zeros where they enter, so what they hold never matters.

    ``validate_inputs`` (default True) checks shapes, masks and ``context_index`` on every call; the
    layers and fusions that own this one switch it off and check once at their own entry.
    """

    validate_inputs: bool = True

    def __init__(self, query_dim: int, context_dim: int, *, dim: int | None = None, num_heads: int = 8,
                 out_dim: int | None = None, qkv_bias: bool = True, dropout: float = 0.0,
                 impl: str | AttentionConfig = "auto") -> None:
        super().__init__()
        dim = query_dim if dim is None else dim
        if num_heads < 1 or dim % num_heads != 0:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.query_dim = query_dim
        self.context_dim = context_dim
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.out_dim = out_dim or query_dim
        self.q_proj = nn.Linear(query_dim, dim, bias=qkv_bias)
        self.k_proj = nn.Linear(context_dim, dim, bias=qkv_bias)
        self.v_proj = nn.Linear(context_dim, dim, bias=qkv_bias)
        self.attn = Attention(impl=impl, dropout=dropout)
        self.out_proj = nn.Linear(dim, self.out_dim)
        self.init_weights()

    def init_weights(self) -> None:
        for proj in (self.q_proj, self.k_proj, self.v_proj, self.out_proj):
            init_linear(proj)

    def forward(self, x: Tensor, context: Tensor, *, context_mask: Tensor | None = None,
                context_index: Tensor | None = None, need_weights: bool = False, causal: bool = False,
                cache: KVCache | None = None) -> tuple[Tensor, Tensor | None]:
        if self.validate_inputs:
            check_tokens(x, self.query_dim, "x", seq="Nq")
            B = x.shape[0]
            check_tokens(context, self.context_dim, "context", batch=None if context_index is not None else B,
                         seq="Nk")
            check_mask(context_mask, context, "context_mask")
            if context_index is not None:
                check_context_index(context_index, B, context.shape[0])
            # Self-attention passes one tensor as both: its padded rows are then queries too.
            self_attention = x is context
            context = zero_padding(context, context_mask)
            x = context if self_attention else x
        if cache is not None and not cache.static and context_mask is not None:
            raise ValueError("a growing KVCache takes no context_mask (it would have to cover the cached keys)")
        B, Nq, _ = x.shape
        I, Nk, _ = context.shape
        H, Dh = self.num_heads, self.head_dim

        if context_index is not None and context_mask is not None:
            context_mask = context_mask[context_index]  # (B, Nk)
        q = self.q_proj(x).view(B, Nq, H, Dh).transpose(1, 2)  # (B, H, Nq, Dh)
        static = cache is not None and cache.static
        if cache is not None and cache.full:
            k, v = cache.k, cache.v  # the context was projected (and its padding zeroed) at the first step
        else:
            k = self.k_proj(context).view(I, Nk, H, Dh).transpose(1, 2)  # (I, H, Nk, Dh)
            v = self.v_proj(context).view(I, Nk, H, Dh).transpose(1, 2)  # (I, H, Nk, Dh)
            if context_index is not None:
                k, v = gather_rows(k, context_index), gather_rows(v, context_index)  # (B, H, Nk, Dh)
            if cache is not None:
                k, v = cache.update(k, v, context_mask if static else None)  # (B, H, N cached + Nk, Dh)
        out, weights = self.attn(q, k, v, key_padding_mask=context_mask, need_weights=need_weights, causal=causal,
                                 padding_zeroed=static)
        out = self.out_proj(out.transpose(1, 2).reshape(B, Nq, self.dim))  # (B, Nq, out_dim)
        if context_mask is not None:
            out = out.masked_fill(~context_mask.any(dim=1)[:, None, None], 0.0)
        elif Nk == 0:  # no context token at all: no message either
            out = torch.zeros_like(out)
        return out, weights

    def extra_repr(self) -> str:
        return (f"query_dim={self.query_dim}, context_dim={self.context_dim}, dim={self.dim}, "
                f"num_heads={self.num_heads}")


class AttentionBlock(nn.Module):
    """Pre-norm transformer block: [self-attention] -> [cross-attention] -> feed-forward.

    Each step is residual: ``x = x + step(LayerNorm(x))``; the context is layer-normed too. The
    self-attention step is present when ``self_attention`` is true, the cross-attention step when
    ``context_dim`` is given. With ``gated=True`` every residual branch is scaled by ``tanh(gate)``
    with the gate starting at zero (Flamingo), so the block starts as the identity.

    ``forward(x, context=None, *, mask=None, context_mask=None, context_index=None, need_weights=False)``
    returns
    ``(x, weights)``: ``mask`` is the key-padding mask of ``x`` (for self-attention), and ``weights``
    are those of the cross-attention when there is one, else of the self-attention.

    ``impl`` serves both attentions; for ``lowrank`` give the longest sequences they attend over,
    ``max_tokens`` (of ``x``, for self-attention) and ``max_context_tokens``, unless ``impl`` already
    sets ``max_len``. The block checks its inputs once (``validate_inputs``), not in its sub-layers.

    A decoder passes ``causal=True`` and, when decoding step by step, a ``self_cache`` and a static
    ``cross_cache`` (:class:`~mmfuse.attention.KVCache`).
    """

    validate_inputs: bool = True

    def __init__(self, dim: int, *, context_dim: int | None = None, self_attention: bool = True,
                 num_heads: int = 8, mlp_ratio: float = 4.0, dropout: float = 0.0, gated: bool = False,
                 impl: str | AttentionConfig = "auto", max_tokens: int | None = None,
                 max_context_tokens: int | None = None) -> None:
        super().__init__()
        if context_dim is None and not self_attention:
            raise ValueError("an AttentionBlock needs self-attention, cross-attention (context_dim) or both")
        self.dim = dim
        self.context_dim = context_dim
        config = AttentionConfig.coerce(impl)
        cross = context_dim is not None

        def attention(context_dim: int, max_len: int | None) -> CrossAttention:
            keys = config if max_len is None else config.for_keys(max_len)
            return CrossAttention(dim, context_dim, num_heads=num_heads, dropout=dropout, impl=keys)

        self.norm_self = nn.LayerNorm(dim) if self_attention else None
        self.self_attn = attention(dim, max_tokens) if self_attention else None
        self.norm_cross = nn.LayerNorm(dim) if cross else None
        self.norm_context = nn.LayerNorm(context_dim) if cross else None
        self.cross_attn = attention(context_dim, max_context_tokens) if cross else None
        self.norm_ff = nn.LayerNorm(dim)
        self.ff = FeedForward(dim, mlp_ratio=mlp_ratio, dropout=dropout)
        self.drop = nn.Dropout(dropout)
        self.gate_self = nn.Parameter(torch.zeros(1)) if gated and self_attention else None
        self.gate_cross = nn.Parameter(torch.zeros(1)) if gated and cross else None
        self.gate_ff = nn.Parameter(torch.zeros(1)) if gated else None
        trust_inputs(*(m for m in (self.self_attn, self.cross_attn) if m is not None))

    def init_weights(self) -> None:
        """Gates back to zero; the attention and MLP layers initialise themselves."""
        for gate in (self.gate_self, self.gate_cross, self.gate_ff):
            if gate is not None:
                nn.init.zeros_(gate)

    @staticmethod
    def _add(x: Tensor, branch: Tensor, gate: Tensor | None) -> Tensor:
        return x + (branch if gate is None else torch.tanh(gate) * branch)

    def forward(self, x: Tensor, context: Tensor | None = None, *, mask: Tensor | None = None,
                context_mask: Tensor | None = None, context_index: Tensor | None = None,
                need_weights: bool = False, causal: bool = False, self_cache: KVCache | None = None,
                cross_cache: KVCache | None = None) -> tuple[Tensor, Tensor | None]:
        if self.validate_inputs:
            self.check_inputs(x, context, mask=mask, context_mask=context_mask, context_index=context_index)
            x = zero_padding(x, mask)
            context = None if context is None else zero_padding(context, context_mask)
        weights = None
        if self.self_attn is not None:
            h = self.norm_self(x)
            h, weights = self.self_attn(h, h, context_mask=mask, causal=causal, cache=self_cache,
                                        need_weights=need_weights and self.cross_attn is None)
            x = self._add(x, self.drop(h), self.gate_self)
        if self.cross_attn is not None:
            # a full static cache already holds the projected context: skip its LayerNorm too
            ctx = context if cross_cache is not None and cross_cache.full else self.norm_context(context)
            h, weights = self.cross_attn(self.norm_cross(x), ctx, context_mask=context_mask,
                                         context_index=context_index, need_weights=need_weights, cache=cross_cache)
            x = self._add(x, self.drop(h), self.gate_cross)
        x = self._add(x, self.ff(self.norm_ff(x)), self.gate_ff)
        return x, weights

    def check_inputs(self, x: Tensor, context: Tensor | None = None, *, mask: Tensor | None = None,
                     context_mask: Tensor | None = None, context_index: Tensor | None = None) -> None:
        """Raise ``ValueError`` naming the shapes unless the arguments fit this block's forward."""
        check_tokens(x, self.dim, "x")
        check_mask(mask, x, "mask")
        if (context is None) != (self.cross_attn is None):
            raise ValueError("context must be given exactly when the block has cross-attention (context_dim)")
        if context is not None:
            check_tokens(context, self.context_dim, "context",
                         batch=None if context_index is not None else x.shape[0], seq="Nk")
            check_mask(context_mask, context, "context_mask")
            if context_index is not None:
                check_context_index(context_index, x.shape[0], context.shape[0])


def apply_blocks(blocks: nn.ModuleList, x: Tensor, context: Tensor | None = None, *,
                 mask: Tensor | None = None, context_mask: Tensor | None = None,
                 context_index: Tensor | None = None, need_weights: bool = False) -> tuple[Tensor, Tensor | None]:
    """Run a stack of :class:`AttentionBlock` s; ``context`` goes to those with cross-attention.

    Returns ``(x, weights of the last block | None)``; only the last block is asked for weights, so
    the others keep the fused attention path.
    """
    weights = None
    for i, block in enumerate(blocks):
        last = i == len(blocks) - 1
        x, weights = block(x, context if block.cross_attn is not None else None, mask=mask,
                           context_mask=context_mask, context_index=context_index,
                           need_weights=need_weights and last)
    return x, weights
