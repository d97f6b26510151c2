"""Exact attention over a block plan, flash-attention style: the engine behind ``chunked`` and ``local``.

A *plan* lists query blocks and, for each, the key tiles it attends to. The forward pass keeps a
running max and running sum per query row (online softmax) and saves only the output and the row
log-sum-exp; the backward pass recomputes each tile's scores. No (Nq, Nk) tensor is ever built: peak
extra memory is a few (B*H, block_q, block_k) tiles on top of the O(N * D) inputs, output and
gradients.

``chunked`` is the dense plan (every query block sees every key tile). ``local`` is a band plan: a
query block sees the global keys plus the key band spanned by its rows' windows, and a tile carries the
per-row window start ``lo`` when the window cuts through it. Cost is therefore proportional to the
number of tiles the plan lists, which for ``local`` grows linearly with the sequence length.

Shapes inside this module are flattened over batch and heads: q (BH, Nq, D), k (BH, Nk, D),
v (BH, Nk, Dv), keep (BH, 1, Nk) bool or None.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from typing import NamedTuple

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

__all__ = ["Tile", "block_attention", "causal_plan", "dense_plan", "local_attention_mask", "local_centres",
           "local_plan"]

_INF = float("inf")


class Tile(NamedTuple):
    """Keys [k0, k1) for one query block; ``lo`` (rows, 1): first key each row may see, None = all;
    ``hi`` (rows, 1): last key each row may see (causal), None = all."""

    k0: int
    k1: int
    lo: Tensor | None = None
    hi: Tensor | None = None


# One query block: (q0, q1, tiles). A plan is a list of them, covering every query row exactly once.
QueryBlock = tuple[int, int, list[Tile]]


def _split(k0: int, k1: int, block_k: int) -> list[Tile]:
    """Unmasked tiles of at most ``block_k`` keys over [k0, k1)."""
    return [Tile(a, min(a + block_k, k1)) for a in range(k0, k1, block_k)]


def dense_plan(nq: int, nk: int, block_q: int, block_k: int) -> list[QueryBlock]:
    """Every query block attends to every key tile (exact full attention)."""
    tiles = _split(0, nk, block_k)
    return [(q0, min(q0 + block_q, nq), tiles) for q0 in range(0, nq, block_q)]


def causal_plan(plan: list[QueryBlock], nq: int, nk: int,
                device: torch.device | str | None = None) -> list[QueryBlock]:
    """``plan`` restricted to keys ``j <= i + Nk - Nq`` for query i: tiles past a block's last visible key
    are dropped, tiles that the diagonal cuts carry the rows' last key ``hi``."""
    offset = nk - nq
    out: list[QueryBlock] = []
    for q0, q1, tiles in plan:
        first, last = q0 + offset, q1 - 1 + offset  # the block's rows see up to these keys
        hi = torch.arange(first, last + 1, device=device)[:, None]  # (rows, 1)
        kept = []
        for tile in tiles:
            if tile.k0 > last:
                continue
            kept.append(tile if tile.k1 - 1 <= first else tile._replace(hi=hi))
        out.append((q0, q1, kept))
    return out


def local_centres(nq: int, nk: int) -> list[int]:
    """Centre key of each query: ``round(i * (Nk - 1) / (Nq - 1))`` (halves up), the middle key if Nq == 1.

    With Nq == Nk this is the identity, i.e. the usual sliding window of self-attention.
    """
    if nq == 1:
        return [(nk - 1) // 2]
    return [(2 * i * (nk - 1) + nq - 1) // (2 * (nq - 1)) for i in range(nq)]


def _window_lo(nq: int, nk: int, window: int) -> list[int]:
    return [c - window // 2 for c in local_centres(nq, nk)]


def local_attention_mask(nq: int, nk: int, *, window: int, num_global: int = 0,
                         device: torch.device | str | None = None) -> Tensor:
    """The (Nq, Nk) bool mask (True = attend) that ``impl="local"`` computes without building it.

    Query i sees keys ``lo_i <= j < lo_i + window`` with ``lo_i = centre_i - window // 2`` (see
    :func:`local_centres`), plus the first ``num_global`` keys; when Nq == Nk the first
    ``num_global`` queries also see every key. A window of ``2 * Nk - 1`` or more covers everything.
    """
    lo = torch.tensor(_window_lo(nq, nk, window), device=device)[:, None]  # (Nq, 1)
    j = torch.arange(nk, device=device)
    mask = (j >= lo) & (j < lo + window)  # (Nq, Nk)
    mask[:, :num_global] = True
    if nq == nk:
        mask[:num_global] = True
    return mask


# Cached: a layer calls with the same lengths step after step, and building a plan copies the window
# starts to the device. The plans are never modified.
@lru_cache(maxsize=64)
def local_plan(nq: int, nk: int, *, window: int, num_global: int, block_q: int, block_k: int,
               device: torch.device | str | None = None) -> list[QueryBlock]:
    """Band plan for :func:`local_attention_mask`: O((Nq / block_q) * (block_q * Nk / Nq + window + g))."""
    g = min(num_global, nk)
    gq = min(num_global, nq) if nq == nk else 0
    starts = _window_lo(nq, nk, window)
    lo_all = torch.tensor(starts, device=device)[:, None]  # (Nq, 1)
    global_tiles = _split(0, g, block_k)
    plan: list[QueryBlock] = [(q0, min(q0 + block_q, gq), _split(0, nk, block_k)) for q0 in range(0, gq, block_q)]
    for q0 in range(gq, nq, block_q):
        q1 = min(q0 + block_q, nq)
        # Window starts grow down the rows, so the first and last rows bound the block's band.
        first, last = starts[q0], starts[q1 - 1]
        band = []
        for tile in _split(max(first, g), min(last + window, nk), block_k):
            covered = last <= tile.k0 and tile.k1 <= first + window  # every row sees the whole tile
            band.append(tile if covered else tile._replace(lo=lo_all[q0:q1]))
        plan.append((q0, q1, global_tiles + band))
    return plan


def _stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """Softmax statistics and accumulators: float32 for half types, float64 stays float64."""
    return torch.promote_types(dtype, torch.float32)


def _scores(qi: Tensor, k: Tensor, drop: Tensor | None, tile: Tile, window: int) -> Tensor:
    """Scores of a query block against one tile (in the stats dtype), -inf where a key may not be seen."""
    s = torch.bmm(qi, k[:, tile.k0:tile.k1].transpose(1, 2)).to(_stats_dtype(qi.dtype))  # (BH, bq, bk)
    if drop is not None:
        s.masked_fill_(drop[:, :, tile.k0:tile.k1], -_INF)
    if tile.lo is not None:
        j = torch.arange(tile.k0, tile.k1, device=s.device)
        s.masked_fill_((j < tile.lo) | (j >= tile.lo + window), -_INF)
    if tile.hi is not None:
        s.masked_fill_(torch.arange(tile.k0, tile.k1, device=s.device) > tile.hi, -_INF)
    return s


def _dropout_scale(like: Tensor, p: float) -> Tensor:
    """Dropout multiplier (0 or 1/(1-p)) of one tile, drawn from the device's default generator.

    Backward redraws the same masks by restoring the generator state forward started from (as
    ``torch.utils.checkpoint`` does) and visiting the tiles in the same order.
    """
    keep = torch.rand(like.shape, device=like.device) >= p
    return keep.to(like.dtype).mul_(1.0 / (1.0 - p))


def _rng_state(device: torch.device) -> Tensor:
    """The default generator's state for ``device``: a host tensor, read without waiting for the device."""
    return torch.get_rng_state() if device.type == "cpu" else getattr(torch, device.type).get_rng_state(device)


@contextmanager
def _replay_rng(device: torch.device, state: Tensor) -> Iterator[None]:
    """Run the block with ``device``'s generator at ``state``; the generator is restored afterwards."""
    devices = [] if device.type == "cpu" else [device]
    with torch.random.fork_rng(devices=devices, device_type=device.type):
        if device.type == "cpu":
            torch.set_rng_state(state)
        else:
            getattr(torch, device.type).set_rng_state(state, device)
        yield


def _accumulate(target: Tensor, a: Tensor, b: Tensor) -> None:
    """target += a @ b (batched), in place and without a temporary when the dtypes allow it."""
    if target.dtype == a.dtype:
        target.baddbmm_(a, b)
    else:
        target.add_(torch.bmm(a, b))


def _forward(q: Tensor, k: Tensor, v: Tensor, drop: Tensor | None, scale: float, dropout_p: float,
             plan: list[QueryBlock], window: int) -> tuple[Tensor, Tensor]:
    BH, Nq, _ = q.shape
    f = dict(dtype=_stats_dtype(q.dtype), device=q.device)
    out = q.new_empty(BH, Nq, v.shape[-1])
    lse = torch.empty(BH, Nq, 1, **f)
    for q0, q1, tiles in plan:
        qi = q[:, q0:q1] * scale  # (BH, bq, D)
        m = torch.full((BH, q1 - q0, 1), -_INF, **f)  # running max
        l = torch.zeros(BH, q1 - q0, 1, **f)  # running sum of exp(s - m)
        acc = torch.zeros(BH, q1 - q0, v.shape[-1], **f)  # running sum of exp(s - m) v
        for tile in tiles:
            s = _scores(qi, k, drop, tile, window)
            m_new = torch.maximum(m, s.amax(dim=-1, keepdim=True))
            shift = m_new.masked_fill(m_new == -_INF, 0.0)  # rows that have seen no key yet
            p = s.sub_(shift).exp_()  # (BH, bq, bk)
            alpha = (m - shift).exp_()
            l.mul_(alpha).add_(p.sum(dim=-1, keepdim=True))
            if dropout_p > 0:
                p.mul_(_dropout_scale(p, dropout_p))
            acc.mul_(alpha)
            _accumulate(acc, p.to(v.dtype), v[:, tile.k0:tile.k1])
            m = m_new
        empty = l == 0  # a row whose every visible key is padding: output 0, no gradient
        out[:, q0:q1] = acc.div_(l.masked_fill(empty, 1.0))
        lse[:, q0:q1] = torch.where(empty, _INF, m + l.log())
    return out, lse


def _backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, drop: Tensor | None,
              scale: float, dropout_p: float, plan: list[QueryBlock],
              window: int) -> tuple[Tensor, Tensor, Tensor]:
    f = dict(dtype=_stats_dtype(q.dtype), device=q.device)
    dq, dk, dv = torch.zeros(q.shape, **f), torch.zeros(k.shape, **f), torch.zeros(v.shape, **f)
    delta = (dout.to(f["dtype"]) * out).sum(dim=-1, keepdim=True)  # (BH, Nq, 1) = rowsum(P * dP)
    for q0, q1, tiles in plan:
        qi = q[:, q0:q1] * scale
        doi = dout[:, q0:q1]
        for tile in tiles:
            kj, vj = k[:, tile.k0:tile.k1], v[:, tile.k0:tile.k1]
            p = _scores(qi, k, drop, tile, window).sub_(lse[:, q0:q1]).exp_()  # (BH, bq, bk)
            dp = torch.bmm(doi, vj.transpose(1, 2)).to(p.dtype)
            if dropout_p > 0:
                z = _dropout_scale(p, dropout_p)
                _accumulate(dv[:, tile.k0:tile.k1], (p * z).transpose(1, 2).to(v.dtype), doi)
                dp.mul_(z)
            else:
                _accumulate(dv[:, tile.k0:tile.k1], p.transpose(1, 2).to(v.dtype), doi)
            ds = dp.sub_(delta[:, q0:q1]).mul_(p).to(q.dtype)  # dL/d(scaled scores)
            _accumulate(dq[:, q0:q1], ds, kj)
            _accumulate(dk[:, tile.k0:tile.k1], ds.transpose(1, 2), qi)  # qi carries the scale
        dq[:, q0:q1].mul_(scale)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


class _BlockAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, drop: Tensor | None, scale: float, dropout_p: float,
                plan: list[QueryBlock], window: int) -> Tensor:
        # The masks come from the default generator, so torch.manual_seed governs dropout; backward
        # replays them from this state (a host tensor: reading it does not wait for the device).
        ctx.rng_state = _rng_state(q.device) if dropout_p > 0 else None
        out, lse = _forward(q, k, v, drop, scale, dropout_p, plan, window)
        ctx.save_for_backward(q, k, v, out, lse, drop)
        ctx.args = (scale, dropout_p, plan, window)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dout: Tensor):
        q, k, v, out, lse, drop = ctx.saved_tensors
        if ctx.rng_state is None:
            dq, dk, dv = _backward(dout, q, k, v, out, lse, drop, *ctx.args)
        else:
            with _replay_rng(q.device, ctx.rng_state):
                dq, dk, dv = _backward(dout, q, k, v, out, lse, drop, *ctx.args)
        return dq, dk, dv, None, None, None, None, None


def block_attention(q: Tensor, k: Tensor, v: Tensor, keep: Tensor | None, scale: float, dropout_p: float,
                    plan: list[QueryBlock], window: int = 0) -> Tensor:
    """Attention of q (B, H, Nq, D) over k, v (B, H, Nk, D|Dv) restricted to ``plan``; keep (B, 1, 1, Nk).

    Rows that can see no kept key get zeros.
    """
    B, H, Nq, _ = q.shape
    Nk, Dv = k.shape[2], v.shape[-1]
    drop = None
    if keep is not None:
        drop = (~keep).expand(B, H, 1, Nk).reshape(B * H, 1, Nk)
    # CPUs without half-precision matrix units run bf16 bmm ~50x slower than float32 (measured on the
    # 2-core development machine), so on CPU the tiles are computed from float32 copies: O(N * D) memory.
    dtype = _stats_dtype(q.dtype) if q.device.type == "cpu" else q.dtype
    q3, k3, v3 = (x.to(dtype).reshape(B * H, x.shape[2], x.shape[-1]) for x in (q, k, v))  # (BH, N, D)
    out = _BlockAttention.apply(q3, k3, v3, drop, scale, dropout_p, plan, window)
    return out.view(B, H, Nq, Dv).to(q.dtype)
