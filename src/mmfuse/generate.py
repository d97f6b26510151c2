"""Decoding for the caption / answer decoder: greedy, beam search, sampling; batched, with a KV cache.

A decoder is any model with ``decode(ids, context, context_mask, *, cache, need_weights) -> (logits (B, T,
V), weights (B, T, N) | None)`` and ``new_cache()`` (see :class:`mmfuse.models.captioner.Captioner`).

Shapes::

    B  sequences    N  context tokens    T  generated tokens    V  vocabulary

    context: (B, N, C)    context_mask: (B, N) bool | None
    Generated.tokens: (B, T) ids after ``<bos>``, ``<pad>`` after each row's ``<eos>``
    Generated.scores: (B,) summed log-probability (beam search: divided by the length penalty)
    Generated.attention: (B, T, N) where the decoder looked while writing each token, or None

With ``use_cache`` (the default) each step feeds only the newest token and reuses the keys and values of
the earlier ones; without it every step runs the whole prefix again (the reference the cache is tested
and benchmarked against).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

__all__ = ["STRATEGIES", "Generated", "generate"]

STRATEGIES = ("greedy", "beam", "sample")
_PAD, _BOS, _EOS = 0, 2, 3


@dataclass
class Generated:
    tokens: Tensor
    scores: Tensor
    attention: Tensor | None = None


def _filter_logits(logits: Tensor, top_k: int, top_p: float) -> Tensor:
    """Logits (B, V) with everything outside the top ``top_k`` / the nucleus of mass ``top_p`` at -inf."""
    if top_k > 0:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # drop a token when the mass before it already reaches top_p (the most likely token always stays)
        drop = probs.cumsum(dim=-1) - probs >= top_p
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    return logits


@torch.no_grad()
def generate(model: Any, context: Tensor, context_mask: Tensor | None = None, *,
             strategy: Literal["greedy", "beam", "sample"] = "greedy", max_new_tokens: int = 32,
             num_beams: int = 4, length_penalty: float = 1.0, temperature: float = 1.0, top_k: int = 0,
             top_p: float = 1.0, use_cache: bool = True, need_weights: bool = False, eos: int | None = _EOS,
             bos: int = _BOS, pad: int = _PAD, generator: torch.Generator | None = None) -> Generated:
    """Generate up to ``max_new_tokens`` tokens after ``<bos>`` for each context row; see the module docstring.

    ``eos=None`` never stops early (benchmarks time exactly ``max_new_tokens`` steps). Beam search keeps
    ``num_beams`` hypotheses per row, finished ones frozen, and returns the best by ``score / ((5 +
    length) / 6) ** length_penalty`` (GNMT's length penalty; 0 ranks by the summed log-probability).
    Sampling draws from ``softmax(logits / temperature)`` restricted to ``top_k`` tokens (0: all) and to
    the nucleus of mass ``top_p``.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if max_new_tokens < 1 or num_beams < 1 or not temperature > 0 or top_k < 0 or not 0 < top_p <= 1:
        raise ValueError(f"need max_new_tokens >= 1, num_beams >= 1, temperature > 0, top_k >= 0 and 0 < top_p <= 1;"
                         f" got {max_new_tokens}, {num_beams}, {temperature}, {top_k}, {top_p}")
    if strategy == "beam":
        return _beam(model, context, context_mask, max_new_tokens=max_new_tokens, num_beams=num_beams,
                     length_penalty=length_penalty, use_cache=use_cache, need_weights=need_weights, eos=eos,
                     bos=bos, pad=pad)
    B = context.shape[0]
    ids = torch.full((B, 1 + max_new_tokens), pad, dtype=torch.long, device=context.device)  # filled as we go
    ids[:, 0] = bos
    cache = model.new_cache() if use_cache else None
    finished = torch.zeros(B, dtype=torch.bool, device=context.device)
    scores = torch.zeros(B, device=context.device)
    attention = []
    t = 0
    for t in range(1, max_new_tokens + 1):
        logits, weights = model.decode(ids[:, t - 1:t] if cache is not None else ids[:, :t], context, context_mask,
                                       cache=cache, need_weights=need_weights)
        logits = logits[:, -1].float()  # (B, V)
        if strategy == "greedy":
            token = logits.argmax(dim=-1)
        else:
            probs = _filter_logits(logits / temperature, top_k, top_p).softmax(dim=-1)
            token = torch.multinomial(probs, 1, generator=generator)[:, 0]
        token = token.masked_fill(finished, pad)
        scores += logits.log_softmax(dim=-1).gather(1, token[:, None])[:, 0].masked_fill(finished, 0.0)
        ids[:, t] = token
        if weights is not None:
            attention.append(weights[:, -1])  # (B, N)
        if eos is not None:
            finished |= token == eos
            if bool(finished.all()):  # the one read-back of a step; eos=None never waits
                break
    return Generated(ids[:, 1:t + 1], scores, torch.stack(attention, dim=1) if attention else None)


def _beam(model: Any, context: Tensor, context_mask: Tensor | None, *, max_new_tokens: int, num_beams: int,
          length_penalty: float, use_cache: bool, need_weights: bool, eos: int | None, bos: int,
          pad: int) -> Generated:
    B, K = context.shape[0], num_beams
    device = context.device
    context = context.repeat_interleave(K, dim=0)  # (B*K, N, C): beam k of row b is row b*K + k
    context_mask = None if context_mask is None else context_mask.repeat_interleave(K, dim=0)
    ids = torch.full((B * K, 1), bos, dtype=torch.long, device=device)
    cache = model.new_cache() if use_cache else None
    beam_scores = torch.zeros(B, K, device=device)
    beam_scores[:, 1:] = float("-inf")  # all beams start equal: keep one until the first step branches
    finished = torch.zeros(B * K, dtype=torch.bool, device=device)
    lengths = torch.zeros(B * K, device=device)
    attention: Tensor | None = None
    for _ in range(max_new_tokens):
        logits, weights = model.decode(ids[:, -1:] if cache is not None else ids, context, context_mask,
                                       cache=cache, need_weights=need_weights)
        logp = logits[:, -1].float().log_softmax(dim=-1)  # (B*K, V)
        V = logp.shape[-1]
        # A finished hypothesis may only continue with <pad> at no cost: its score is frozen.
        frozen = torch.full_like(logp, float("-inf"))
        frozen[:, pad] = 0.0
        logp = torch.where(finished[:, None], frozen, logp)
        candidates = (beam_scores.reshape(-1, 1) + logp).view(B, K * V)
        beam_scores, best = candidates.topk(K, dim=-1)  # (B, K)
        source = (torch.arange(B, device=device)[:, None] * K + best // V).reshape(-1)  # (B*K,)
        token = (best % V).reshape(-1)
        ids = torch.cat([ids[source], token[:, None]], dim=1)
        finished, lengths = finished[source], lengths[source]
        lengths += (~finished).float()  # the token that ends a hypothesis (<eos>) counts
        if cache is not None:
            cache.reorder(source)
        if weights is not None:
            step = weights[:, -1][source][:, None]  # (B*K, 1, N)
            attention = step if attention is None else torch.cat([attention[source], step], dim=1)
        if eos is not None:
            finished |= token == eos
            if bool(finished.all()):
                break
    penalty = ((5.0 + lengths.view(B, K)) / 6.0) ** length_penalty
    final = beam_scores / penalty
    pick = torch.arange(B, device=device) * K + final.argmax(dim=-1)  # (B,)
    return Generated(ids[pick, 1:], final.max(dim=-1).values, None if attention is None else attention[pick])
