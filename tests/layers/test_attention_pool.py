"""AttentionPooling: a fixed number of tokens from any number of inputs."""

import re

import pytest
import torch
from torch.testing import assert_close

from mmfuse.layers import AttentionPooling

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.mark.parametrize("length", [1, 7, 196, 1000])
def test_returns_num_queries_tokens_for_any_length(length):
    pool = AttentionPooling(16, num_queries=5, num_heads=4, depth=2, out_dim=12)
    tokens, weights = pool(torch.randn(2, length, 16), need_weights=True)
    assert tokens.shape == (2, 5, 12)
    assert weights.shape == (2, 4, 5, length)
    assert torch.isfinite(tokens).all()


def test_weights_are_over_kept_inputs():
    pool = AttentionPooling(16, num_queries=3, num_heads=2)
    mask = torch.tensor([[True, False, True, True], [False, False, True, False]])
    _, weights = pool(torch.randn(2, 4, 16), mask=mask, need_weights=True)
    assert_close(weights.sum(-1), torch.ones(2, 2, 3))
    assert (weights.masked_select(~mask[:, None, None, :]) == 0).all()


def test_output_is_invariant_to_input_order():
    pool = AttentionPooling(16, num_queries=3, num_heads=2, depth=2).eval()
    x = torch.randn(2, 6, 16)
    perm = torch.randperm(6)
    assert_close(pool(x[:, perm])[0], pool(x)[0])


def test_latents_init_trunc_normal_with_std_dim_to_minus_half():
    pool = AttentionPooling(256, num_queries=512, num_heads=8)
    std = pool.latents.std().item()
    assert 0.8 * 256**-0.5 < std < 256**-0.5
    assert pool.latents.abs().max() <= 2.0


def test_same_latents_for_every_sample_different_outputs():
    pool = AttentionPooling(16, num_queries=3, num_heads=2).eval()
    tokens, _ = pool(torch.randn(2, 5, 16))
    assert not torch.allclose(tokens[0], tokens[1])


def test_out_dim_defaults_to_input_dim():
    pool = AttentionPooling(16, num_queries=3, num_heads=2)
    assert pool.out_dim == 16 and pool(torch.randn(1, 4, 16))[0].shape == (1, 3, 16)


def test_wrong_shapes_name_expected_and_received():
    pool = AttentionPooling(16, num_queries=3, num_heads=2)
    with pytest.raises(ValueError, match=re.escape("x must have shape (B, N, 16), got (2, 5, 8)")):
        pool(torch.randn(2, 5, 8))
    with pytest.raises(ValueError, match=re.escape("x must have shape (B, N, 16), got (5, 16)")):
        pool(torch.randn(5, 16))
    with pytest.raises(ValueError, match=re.escape("mask must have shape (B, N) = (2, 5), got (2, 6)")):
        pool(torch.randn(2, 5, 16), mask=torch.ones(2, 6, dtype=torch.bool))
    with pytest.raises(ValueError, match="num_queries and depth must be >= 1"):
        AttentionPooling(16, num_queries=0)
