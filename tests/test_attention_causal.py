"""Causal attention (every implementation that supports it) and the KV cache of decoding."""

import pytest
import torch
from torch.testing import assert_close

from mmfuse.attention import KVCache, attend, causal_mask
from mmfuse.layers import AttentionBlock, CrossAttention

pytestmark = pytest.mark.usefixtures("single_thread")

# (impl, options): every implementation that can be causal, made exact (local's window covers everything)
CAUSAL_IMPLS = [("math", {}), ("auto", {}), ("chunked", {"block_q": 2, "block_k": 3}),
                ("local", {"window": 128, "block_q": 2, "block_k": 3})]


def reference(q, k, v, keep):
    """Softmax under an explicit (B, 1, Nq, Nk) mask written out by hand; rows seeing nothing give zeros."""
    scores = q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5
    scores = scores.masked_fill(~keep, float("-inf"))
    weights = torch.nan_to_num(scores.softmax(dim=-1), nan=0.0)
    return weights @ v


def explicit_mask(B, Nq, Nk, padding=None):
    keep = torch.zeros(B, 1, Nq, Nk, dtype=torch.bool)
    for i in range(Nq):
        keep[:, :, i, : i + Nk - Nq + 1] = True  # query i is token i + Nk - Nq of the sequence
    if padding is not None:
        keep &= padding[:, None, None, :]
    return keep


def test_causal_mask_matches_the_hand_written_one():
    assert torch.equal(causal_mask(3, 5), explicit_mask(1, 3, 5)[0, 0])
    assert torch.equal(causal_mask(4, 4), torch.ones(4, 4, dtype=torch.bool).tril())


@pytest.mark.parametrize("impl,options", CAUSAL_IMPLS)
@pytest.mark.parametrize("Nq,Nk", [(7, 7), (3, 7), (1, 5), (40, 40)])
@pytest.mark.parametrize("padded", [False, True])
def test_causal_matches_an_explicit_mask(impl, options, Nq, Nk, padded):
    torch.manual_seed(0)
    B, H, D = 3, 2, 8
    q, k, v = (torch.randn(B, H, n, D, dtype=torch.float64) for n in (Nq, Nk, Nk))
    padding = None
    if padded:
        padding = torch.rand(B, Nk) > 0.3
        padding[0, 0] = False  # sample 0's first query may see no kept key at all: zeros
        padding[1] = True
    out, _ = attend(q, k, v, key_padding_mask=padding, causal=True, impl=impl, **options)
    expected = reference(q, k, v, explicit_mask(B, Nq, Nk, padding))
    assert_close(out, expected)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("impl,options", CAUSAL_IMPLS[2:])
def test_causal_blocked_gradients_match_math(impl, options):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 2, 9, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    out, _ = attend(q, k, v, causal=True, impl=impl, **options)
    ref, _ = attend(q, k, v, causal=True, impl="math")
    g = torch.randn_like(out)
    assert_close(torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(ref, (q, k, v), g))


def test_causal_output_ignores_the_future():
    """Changing the last key/value changes only the last query's output."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 6, 4) for _ in range(3))
    out, _ = attend(q, k, v, causal=True, impl="auto")
    k2, v2 = k.clone(), v.clone()
    k2[:, :, -1] += 5
    v2[:, :, -1] -= 3
    out2, _ = attend(q, k2, v2, causal=True, impl="auto")
    assert_close(out[:, :, :-1], out2[:, :, :-1])
    assert not torch.allclose(out[:, :, -1], out2[:, :, -1])


def test_lowrank_refuses_causal():
    q, k, v = (torch.randn(1, 1, 4, 2) for _ in range(3))
    with pytest.raises(ValueError, match="causal"):
        attend(q, k, v, causal=True, impl="lowrank", proj_k=torch.randn(2, 4), proj_v=torch.randn(2, 4))


def test_kv_cache_appends_and_reorders():
    cache = KVCache()
    a, b = torch.randn(2, 1, 3, 4), torch.randn(2, 1, 1, 4)
    cache.update(a, a)
    k, _ = cache.update(b, b)
    assert len(cache) == 4 and torch.equal(k, torch.cat([a, b], dim=2))
    cache.reorder(torch.tensor([1, 1]))
    assert torch.equal(cache.k[0], cache.k[1])
    static = KVCache(static=True)
    static.update(a, a)
    assert static.full and torch.equal(static.update(b, b)[0], b)  # a static cache is replaced, never grown


def test_kv_cache_preallocates_and_grows_past_its_capacity():
    """Writes into a buffer (no copy of the cached keys per step), doubling it when a sequence outgrows it."""
    cache = KVCache(capacity=3)
    steps = [torch.randn(2, 1, n, 4) for n in (2, 1, 1, 3)]
    buffers = []
    for x in steps:
        k, v = cache.update(x, -x)
        buffers.append(cache._k)
    assert buffers[0] is buffers[1]  # the second step wrote in place
    assert torch.equal(k, torch.cat(steps, dim=2)) and torch.equal(v, -k) and len(cache) == 7
    assert cache._k.shape[2] >= 7
    cache.reorder(torch.tensor([1, 0]))
    assert torch.equal(cache.k, torch.cat(steps, dim=2).flip(0)) and len(cache) == 7
    with pytest.raises(ValueError, match="capacity"):
        KVCache(capacity=0)


def test_kv_cache_under_autograd_concatenates():
    """Keys that require grad are never written in place: the gradient through two steps is right."""
    a, b = (torch.randn(1, 1, n, 2, requires_grad=True) for n in (2, 1))
    cache = KVCache(capacity=8)
    first, _ = cache.update(a, a)
    (first.sum() + cache.update(b, b)[0].pow(2).sum()).backward()
    assert_close(a.grad, 1 + 2 * a.detach())
    assert_close(b.grad, 2 * b.detach())


def test_static_cache_zeroes_padding_once():
    """A static cache given the context mask stores zeros there; attend then skips its own selection."""
    q = torch.randn(2, 2, 1, 4)
    k, v = torch.randn(2, 2, 5, 4), torch.randn(2, 2, 5, 4)
    mask = torch.tensor([[True, True, False, True, False], [True] * 5])
    k[0, :, 2] = float("nan")
    cache = KVCache(static=True)
    ck, cv = cache.update(k, v, mask)
    assert (ck[0, :, [2, 4]] == 0).all() and (cv[0, :, [2, 4]] == 0).all()
    expected, _ = attend(q, k, v, key_padding_mask=mask)
    out, _ = attend(q, ck, cv, key_padding_mask=mask, padding_zeroed=True)
    assert_close(out, expected)
    with pytest.raises(ValueError, match="growing"):
        KVCache().update(k, v, mask)


@pytest.mark.parametrize("impl", ["auto", "math"])
def test_cached_decoding_matches_a_full_forward(impl):
    """Decoding token by token with caches gives the full causal forward's outputs at every position."""
    torch.manual_seed(0)
    blocks = [AttentionBlock(16, context_dim=12, num_heads=4, impl=impl) for _ in range(2)]
    for block in blocks:
        block.eval()
    x = torch.randn(3, 6, 16)
    context = torch.randn(3, 5, 12)
    context_mask = torch.tensor([[True] * 5, [True, True, True, False, False], [True] * 5])
    full = x
    for block in blocks:
        full, _ = block(full, context, context_mask=context_mask, causal=True)
    caches = [(KVCache(), KVCache(static=True)) for _ in blocks]
    steps = []
    for t in range(x.shape[1]):
        h = x[:, t:t + 1]
        for block, (self_cache, cross_cache) in zip(blocks, caches, strict=True):
            h, _ = block(h, context, context_mask=context_mask, causal=True, self_cache=self_cache,
                         cross_cache=cross_cache)
        steps.append(h)
    assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)
    # the prompt in one call, then a step: the cache aligns the new query bottom-right
    caches = [(KVCache(), KVCache(static=True)) for _ in blocks]
    for h in (x[:, :4], x[:, 4:]):
        for block, (self_cache, cross_cache) in zip(blocks, caches, strict=True):
            h, _ = block(h, context, context_mask=context_mask, causal=True, self_cache=self_cache,
                         cross_cache=cross_cache)
    assert_close(h, full[:, 4:6], rtol=1e-5, atol=1e-5)


def test_growing_cache_refuses_a_mask():
    attn = CrossAttention(8, 8, num_heads=2)
    x = torch.randn(2, 1, 8)
    with pytest.raises(ValueError, match="KVCache"):
        attn(x, x, context_mask=torch.ones(2, 1, dtype=torch.bool), cache=KVCache())
