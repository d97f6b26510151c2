"""Shared pieces: masked mean pooling, mask concatenation, shape checks, the MLP."""

import re

import pytest
import torch
from torch.testing import assert_close

from mmfuse.layers.common import FeedForward, check_tokens, concat_masks, masked_mean, trust_inputs


def test_masked_mean_averages_kept_tokens_only():
    x = torch.arange(12.0).view(2, 3, 2)
    mask = torch.tensor([[True, False, True], [False, True, False]])
    assert_close(masked_mean(x, mask), torch.tensor([[2.0, 3.0], [8.0, 9.0]]))
    assert_close(masked_mean(x), x.mean(1))


def test_masked_mean_of_nothing_is_zero_with_finite_gradients():
    x = torch.randn(2, 3, 4, requires_grad=True)
    mask = torch.tensor([[False] * 3, [True, True, False]])
    out = masked_mean(x, mask)
    assert (out[0] == 0).all()
    out.sum().backward()
    assert torch.isfinite(x.grad).all()
    assert (x.grad[0] == 0).all() and (x.grad[1, 2] == 0).all()


def test_concat_masks():
    a, b = torch.zeros(2, 3, 1), torch.zeros(2, 2, 1)
    assert concat_masks([None, None], [a, b]) is None
    mask = concat_masks([None, torch.tensor([[True, False], [False, False]])], [a, b])
    assert mask.tolist() == [[True, True, True, True, False], [True, True, True, False, False]]


def test_check_tokens_message_names_both_shapes():
    with pytest.raises(ValueError, match=re.escape("context must have shape (B, Nk, 64), got (2, 5, 32)")):
        check_tokens(torch.zeros(2, 5, 32), 64, "context", seq="Nk")
    with pytest.raises(ValueError, match=re.escape("x must have shape (3, N, 4), got (2, 5, 4)")):
        check_tokens(torch.zeros(2, 5, 4), 4, "x", batch=3)
    check_tokens(torch.zeros(2, 5, 4), 4, "x", batch=2)


def test_feed_forward_shapes():
    ff = FeedForward(8, mlp_ratio=2.0, out_dim=3)
    assert ff.fc1.out_features == 16
    assert ff(torch.randn(2, 5, 8)).shape == (2, 5, 3)


def test_gather_rows_matches_indexing_forward_and_backward():
    from mmfuse.layers.common import gather_rows

    x = torch.randn(5, 3, 4, dtype=torch.float64, requires_grad=True)
    index = torch.tensor([4, 0, 0, 2, 4, 4])
    out = gather_rows(x, index)
    torch.testing.assert_close(out, x[index], rtol=0, atol=0)
    grad = torch.randn_like(out)
    (g,) = torch.autograd.grad(out, x, grad)
    (ref,) = torch.autograd.grad(x[index], x, grad)
    torch.testing.assert_close(g, ref)
    assert torch.equal(gather_rows(torch.arange(5)[:, None], index), torch.arange(5)[index][:, None])


def test_trust_inputs_switches_off_the_checks_of_a_layer_and_everything_inside():
    from mmfuse.layers import AttentionBlock, AttentionPooling

    pool = AttentionPooling(8, num_queries=2, num_heads=2, depth=2)
    # standalone, the pooling checks its inputs; its blocks were trusted when it built them
    assert pool.validate_inputs
    assert all(not m.validate_inputs for m in pool.blocks.modules() if hasattr(m, "validate_inputs"))
    with pytest.raises(ValueError, match=r"x must have shape \(B, N, 8\), got \(2, 3, 7\)"):
        pool(torch.randn(2, 3, 7))
    block = AttentionBlock(8, context_dim=6, num_heads=2)
    trust_inputs(block)
    assert not block.validate_inputs and not block.cross_attn.validate_inputs and not block.self_attn.validate_inputs
