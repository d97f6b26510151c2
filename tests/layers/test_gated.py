"""GatedCrossAttention: the identity at init, attention once its gates open."""

import re

import pytest
import torch
from torch.testing import assert_close

from mmfuse.layers import GatedCrossAttention

pytestmark = pytest.mark.usefixtures("single_thread")


def test_identity_at_init():
    block = GatedCrossAttention(16, 24, num_heads=4)
    x = torch.randn(2, 5, 16)
    out, weights = block(x, torch.randn(2, 7, 24), context_mask=torch.rand(2, 7) > 0.3, need_weights=True)
    assert torch.equal(out, x)
    assert weights.shape == (2, 4, 5, 7)


def test_init_weights_closes_the_gates_again():
    block = GatedCrossAttention(16, 24, num_heads=4)
    with torch.no_grad():
        block.gate_cross.fill_(1.0)
        block.gate_ff.fill_(1.0)
    block.init_weights()
    x = torch.randn(2, 5, 16)
    assert torch.equal(block(x, torch.randn(2, 7, 24))[0], x)


def test_gates_learn_from_the_first_step():
    block = GatedCrossAttention(16, 24, num_heads=4)
    out, _ = block(torch.randn(2, 5, 16), torch.randn(2, 7, 24))
    out.square().sum().backward()
    assert block.gate_cross.grad.abs().item() > 0
    assert block.gate_ff.grad.abs().item() > 0


def test_open_gates_mix_in_the_context():
    block = GatedCrossAttention(16, 24, num_heads=4).eval()
    with torch.no_grad():
        block.gate_cross.fill_(0.5)
    x = torch.randn(2, 5, 16)
    out_a, _ = block(x, torch.randn(2, 7, 24))
    out_b, _ = block(x, torch.randn(2, 7, 24))
    assert not torch.allclose(out_a, out_b)
    # tanh gate: the cross-attention branch scaled by tanh(0.5).
    branch, _ = block.cross_attn(block.norm_cross(x), block.norm_context(torch.zeros(2, 7, 24)))
    assert_close(block(x, torch.zeros(2, 7, 24))[0], x + torch.tanh(torch.tensor(0.5)) * branch)


def test_wrong_shapes_name_expected_and_received():
    block = GatedCrossAttention(16, 24, num_heads=4)
    with pytest.raises(ValueError, match=re.escape("context must have shape (2, Nk, 24), got (2, 7, 16)")):
        block(torch.randn(2, 5, 16), torch.randn(2, 7, 16))
