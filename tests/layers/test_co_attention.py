"""CoAttention: co-attention blocks, text reading the image."""

import re

import pytest
import torch
from torch.testing import assert_close

from mmfuse.layers import CoAttention

pytestmark = pytest.mark.usefixtures("single_thread")


def test_shapes_and_text_to_image_weights():
    layer = CoAttention(10, 12, dim=16, num_heads=4, depth=3)
    image_mask = torch.tensor([[True] * 5, [True, False, True, False, False]])
    tokens, weights = layer(torch.randn(2, 3, 10), torch.randn(2, 5, 12), image_mask=image_mask,
                            need_weights=True)
    assert tokens.shape == (2, 3, 16)
    assert weights.shape == (2, 4, 3, 5)
    assert_close(weights.sum(-1), torch.ones(2, 4, 3))
    assert (weights.masked_select(~image_mask[:, None, None, :]) == 0).all()
    assert len(layer.blocks) == 3


def test_text_depends_on_image_and_on_other_text_tokens():
    layer = CoAttention(10, 12, dim=16, num_heads=4).eval()
    text, image = torch.randn(1, 3, 10), torch.randn(1, 5, 12)
    out, _ = layer(text, image)
    assert not torch.allclose(layer(text, torch.randn(1, 5, 12))[0], out)
    other = text.clone()
    other[:, 2] = torch.randn(10)
    assert not torch.allclose(layer(other, image)[0][:, 0], out[:, 0])  # self-attention over the text


def test_permuting_image_tokens_changes_nothing():
    layer = CoAttention(10, 12, dim=16, num_heads=4).eval()
    text, image = torch.randn(2, 3, 10), torch.randn(2, 5, 12)
    perm = torch.randperm(5)
    assert_close(layer(text, image[:, perm])[0], layer(text, image)[0])


def test_wrong_shapes_name_expected_and_received():
    layer = CoAttention(10, 12, dim=16, num_heads=4)
    with pytest.raises(ValueError,
                       match=re.escape("image_tokens must have shape (2, Ni, 12), got (2, 5, 10)")):
        layer(torch.randn(2, 3, 10), torch.randn(2, 5, 10))
    with pytest.raises(ValueError, match=re.escape("text_tokens must have shape (B, Nt, 10), got (3, 10)")):
        layer(torch.randn(3, 10), torch.randn(2, 5, 12))
    with pytest.raises(ValueError, match="depth must be >= 1"):
        CoAttention(10, 12, depth=0)
