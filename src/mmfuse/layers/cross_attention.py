"""Multi-head cross-attention, and the pre-norm transformer block every fusion layer is built from.

Shapes::

    B   batch          H   heads         Dh  head dimension (dim // H)
    Nq  queries        Nk  context tokens (keys / values)

    x: (B, Nq, query_dim)   context: (B, Nk, context_dim)   context_mask: (B, Nk) bool, True = keep
    out: (B, Nq, out_dim)   weights: (B, H, Nq, Nk), each row sums to 1 over the kept context tokens

Self-attention is ``CrossAttention(d, d)`` called as ``attn(x, x, context_mask=mask)``.

Shared contexts: with ``context_index`` (B,) the context holds one entry per *image* (I, Nk, ...) and
query row b attends over ``context[context_index[b]]``. Keys and values are then projected once per
image: in VQA about ten questions share an image, so this saves most of the projection work of
training. On CPU the query rows are then laid out by image, so that each image's keys serve all of its
questions in one matrix product; elsewhere the keys and values are gathered to the rows.

Decoding: ``causal=True`` masks future tokens (self-attention of a decoder), and a
:class:`~mmfuse.attention.KVCache` keeps the keys and values of the tokens already decoded, so each step
feeds only the new tokens; a static cache holds a cross-attention's projected context.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mmfuse.attention import Attention, AttentionConfig, KVCache, attend, explicit_on_cpu
from mmfuse.layers.common import (
    FeedForward,
    check_context_index,
    check_mask,
    check_tokens,
    context_slots,
    gather_rows,
    init_linear,
    take_rows,
    to_slots,
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

    ``null_key=True`` adds a learned key and value (zeros at first) that every query may attend to besides
    the context, so that a query can read (almost) nothing from a context that lacks what it looks for;
    the weights returned then cover the context's tokens only and sum to at most 1.

    A sample whose context is entirely masked, or a context of no token (Nk = 0), gets an output of
    zeros (not ``out_proj.bias``): no context, no message, so a residual block adds nothing for it.
    Padded context tokens are replaced by zeros where they enter, so what they hold never matters.

    ``validate_inputs`` (default True) checks shapes, masks and ``context_index`` on every call; the
    layers and fusions that own this one switch it off and check once at their own entry.
    """

    validate_inputs: bool = True

    def __init__(self, query_dim: int, context_dim: int, *, dim: int | None = None, num_heads: int = 8,
                 out_dim: int | None = None, qkv_bias: bool = True, dropout: float = 0.0,
                 impl: str | AttentionConfig = "auto", null_key: bool = False) -> None:
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
        # A learned key and value every query may attend to besides the context: softmax weights sum to 1, so
        # without it a query whose content is absent from the context ("is there a circle?" of a square) still
        # reads the context at full strength; with it, it can read (mostly) nothing.
        self.null_k = nn.Parameter(torch.zeros(self.num_heads, 1, self.head_dim)) if null_key else None
        self.null_v = nn.Parameter(torch.zeros(self.num_heads, 1, self.head_dim)) if null_key else None
        self.init_weights()

    def init_weights(self) -> None:
        for proj in (self.q_proj, self.k_proj, self.v_proj, self.out_proj):
            init_linear(proj)
        if self.null_k is not None:
            nn.init.zeros_(self.null_k)
            nn.init.zeros_(self.null_v)

    def _keys_values(self, context: Tensor) -> tuple[Tensor, Tensor]:
        """The context (N, Nk, context_dim) projected to keys and values, (N, H, Nk, Dh) each."""
        N, Nk, _ = context.shape
        k = self.k_proj(context).view(N, Nk, self.num_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(context).view(N, Nk, self.num_heads, self.head_dim).transpose(1, 2)
        return k, v

    def _with_null(self, k: Tensor, v: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None]:
        """(k, v) (N, H, Nk, Dh) with the null key and value appended, and the mask (N, Nk) with it kept."""
        if self.null_k is None:
            return k, v, mask
        n = k.shape[0]
        k = torch.cat([k, self.null_k.to(k.dtype).expand(n, -1, -1, -1)], dim=2)
        v = torch.cat([v, self.null_v.to(v.dtype).expand(n, -1, -1, -1)], dim=2)
        if mask is not None:
            mask = torch.cat([mask, mask.new_ones(n, 1)], dim=1)
        return k, v, mask

    def _without_null(self, weights: Tensor | None) -> Tensor | None:
        """The weights over the context's tokens: the null key's column dropped (rows then sum to <= 1)."""
        return weights if weights is None or self.null_k is None else weights[..., :-1]

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
        if self.null_k is not None and (cache is not None or causal):
            raise ValueError("a CrossAttention with null_key=True takes no KVCache and no causal mask")
        B, Nq, _ = x.shape
        I, Nk, _ = context.shape
        H, Dh = self.num_heads, self.head_dim

        image_mask = context_mask  # (I, Nk) with a context_index
        if context_index is not None and context_mask is not None:
            context_mask = context_mask[context_index]  # (B, Nk)
        q = self.q_proj(x)  # (B, Nq, dim)
        if context_index is not None and cache is None and not causal:
            slots = self._context_slots(q, context_index, I, Nk)
            if slots is not None:
                out, weights = self._attend_by_context(q, context, image_mask, *slots, need_weights=need_weights)
                return self._finish(out, context_mask, Nk), weights
        q = q.view(B, Nq, H, Dh).transpose(1, 2)  # (B, H, Nq, Dh)
        static = cache is not None and cache.static
        if cache is not None and cache.full:
            k, v = cache.k, cache.v  # the context was projected (and its padding zeroed) at the first step
        else:
            k, v = self._keys_values(context)  # (I, H, Nk, Dh) each
            if context_index is not None:
                k, v = gather_rows(k, context_index), gather_rows(v, context_index)  # (B, H, Nk, Dh)
            if cache is not None:
                k, v = cache.update(k, v, context_mask if static else None)  # (B, H, N cached + Nk, Dh)
        k, v, keys_mask = self._with_null(k, v, context_mask)
        out, weights = self.attn(q, k, v, key_padding_mask=keys_mask, need_weights=need_weights, causal=causal,
                                 padding_zeroed=static)
        weights = self._without_null(weights)
        return self._finish(out.transpose(1, 2).reshape(B, Nq, self.dim), context_mask, Nk), weights

    def _finish(self, out: Tensor, context_mask: Tensor | None, Nk: int) -> Tensor:
        """The output projection of the heads' outputs (B, Nq, dim); zeros for a sample without context."""
        out = self.out_proj(out)  # (B, Nq, out_dim)
        if context_mask is not None:
            out = out.masked_fill(~context_mask.any(dim=1)[:, None, None], 0.0)
        elif Nk == 0:  # no context token at all: no message either
            out = torch.zeros_like(out)
        return out

    def _context_slots(self, q: Tensor, index: Tensor, I: int, Nk: int) -> tuple[Tensor, int] | None:
        """:func:`~mmfuse.layers.common.context_slots` of the query rows, or None to gather instead.

        Used in fp32/fp64 where the explicit attention runs (``math``, or ``auto`` where
        :func:`~mmfuse.attention.explicit_on_cpu` holds for one row's scores): then each context's keys and
        values serve all of its rows in one matrix product, instead of being copied once per row (on a
        2-core CPU the default VQA model's cross-attention, forward and backward, took 6-10 ms against
        14-20 ms). ``context_slots`` itself declines off the CPU, where reading the layout size would wait.
        """
        if self.attn.proj_k is not None:
            return None
        math_runs = self.attn.impl == "math" or (
            self.attn.impl == "auto" and explicit_on_cpu(q.dtype, q.device, q.shape[1], Nk))
        # fp32/fp64: in bf16 the gathered keys' products were the faster (10.5-12.9 ms against 13.2-14.8 ms)
        if not math_runs or q.dtype not in (torch.float32, torch.float64):
            return None
        return context_slots(index, I)

    def _attend_by_context(self, q: Tensor, context: Tensor, image_mask: Tensor | None, slots: Tensor, per: int, *,
                           need_weights: bool) -> tuple[Tensor, Tensor | None]:
        """Attention of ``q`` (B, Nq, dim) over its rows' contexts (I, Nk, context_dim), laid out by context.

        Returns the heads' outputs (B, Nq, dim) and the weights (B, H, Nq, Nk) when asked for. Exact: the
        layout's empty rows are zeros whose outputs are dropped, so they add nothing to any gradient.
        """
        Nq, I = q.shape[1], context.shape[0]
        H, Dh = self.num_heads, self.head_dim
        k, v, image_mask = self._with_null(*self._keys_values(context), image_mask)  # (I, H, Nk [+ 1], Dh) each
        # to_slots and take_rows: their gradients move each row once (the slots are distinct), with no
        # scatter-add, whose order of accumulation on several threads would make runs differ.
        grouped = to_slots(q, slots, I * per)  # (I * per, Nq, dim)
        grouped = grouped.view(I, per * Nq, H, Dh).transpose(1, 2)  # (I, H, per * Nq, Dh)
        out, weights = attend(grouped, k, v, key_padding_mask=image_mask, need_weights=need_weights, impl="math",
                              dropout_p=self.attn.dropout if self.training else 0.0)
        out = take_rows(out.transpose(1, 2).reshape(I * per, Nq, self.dim), slots)  # (B, Nq, dim)
        if weights is not None:
            Nw = k.shape[2]
            weights = take_rows(weights.view(I, H, per, Nq, Nw).transpose(1, 2).reshape(I * per, H, Nq, Nw), slots)
        return out, self._without_null(weights)

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

    ``null_key`` gives the cross-attention a learned key and value to attend to instead of the context
    (:class:`CrossAttention`). ``impl`` serves both attentions; for ``lowrank`` give the longest sequences
    they attend over,
    ``max_tokens`` (of ``x``, for self-attention) and ``max_context_tokens``, unless ``impl`` already
    sets ``max_len``. The block checks its inputs once (``validate_inputs``), not in its sub-layers.

    A decoder passes ``causal=True`` and, when decoding step by step, a ``self_cache`` and a static
    ``cross_cache`` (:class:`~mmfuse.attention.KVCache`).
    """

    validate_inputs: bool = True

    def __init__(self, dim: int, *, context_dim: int | None = None, self_attention: bool = True,
                 num_heads: int = 8, mlp_ratio: float = 4.0, dropout: float = 0.0, gated: bool = False,
                 impl: str | AttentionConfig = "auto", max_tokens: int | None = None,
                 max_context_tokens: int | None = None, null_key: bool = False) -> None:
        super().__init__()
        if context_dim is None and not self_attention:
            raise ValueError("an AttentionBlock needs self-attention, cross-attention (context_dim) or both")
        self.dim = dim
        self.context_dim = context_dim
        config = AttentionConfig.coerce(impl)
        cross = context_dim is not None

        def attention(context_dim: int, max_len: int | None, null_key: bool = False) -> CrossAttention:
            keys = config if max_len is None else config.for_keys(max_len)
            return CrossAttention(dim, context_dim, num_heads=num_heads, dropout=dropout, impl=keys, null_key=null_key)

        self.norm_self = nn.LayerNorm(dim) if self_attention else None
        self.self_attn = attention(dim, max_tokens) if self_attention else None
        self.norm_cross = nn.LayerNorm(dim) if cross else None
        self.norm_context = nn.LayerNorm(context_dim) if cross else None
        self.cross_attn = attention(context_dim, max_context_tokens, null_key) if cross else None
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
