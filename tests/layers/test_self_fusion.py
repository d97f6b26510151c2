"""ModalitySelfAttention: self-attention over the tokens of both modalities."""

import re

import pytest
import torch
from torch.testing import assert_close

from mmfuse.layers import ModalitySelfAttention, ModalityTokens

pytestmark = pytest.mark.usefixtures("single_thread")


def test_shapes_and_weights_over_both_modalities():
    layer = ModalitySelfAttention(12, 10, dim=16, num_heads=4, depth=2)
    image_mask = torch.tensor([[True] * 5, [True, True, False, False, False]])
    text_mask = torch.tensor([[True, True, False], [True, True, True]])
    tokens, weights = layer(torch.randn(2, 5, 12), torch.randn(2, 3, 10), image_mask=image_mask,
                            text_mask=text_mask, need_weights=True)
    assert tokens.shape == (2, 8, 16)
    assert weights.shape == (2, 4, 8, 8)
    keep = torch.cat([image_mask, text_mask], dim=1)
    assert_close(weights.sum(-1), torch.ones(2, 4, 8))
    assert (weights.masked_select(~keep[:, None, None, :]) == 0).all()


def test_text_tokens_read_the_image():
    layer = ModalitySelfAttention(12, 10, dim=16, num_heads=4).eval()
    text = torch.randn(2, 3, 10)
    a, _ = layer(torch.randn(2, 5, 12), text)
    b, _ = layer(torch.randn(2, 5, 12), text)
    assert not torch.allclose(a[:, 5:], b[:, 5:])


def test_modality_embeddings_tell_the_modalities_apart():
    # The same features given as image or as text get different tokens.
    embed = ModalityTokens(8, 8, dim=16)
    x = torch.randn(1, 3, 8)
    embed.text_proj.load_state_dict(embed.image_proj.state_dict())
    tokens, mask = embed(x, x)
    assert mask is None
    shift = embed.modality_embed[1] - embed.modality_embed[0]  # (dim,)
    assert_close(tokens[:, 3:] - tokens[:, :3], shift.expand(1, 3, 16))


def test_one_mask_given_keeps_all_of_the_other_modality():
    embed = ModalityTokens(8, 6, dim=16)
    text_mask = torch.tensor([[True, False]])
    _, mask = embed(torch.randn(1, 3, 8), torch.randn(1, 2, 6), text_mask=text_mask)
    assert mask.tolist() == [[True, True, True, True, False]]


def test_wrong_shapes_name_expected_and_received():
    layer = ModalitySelfAttention(12, 10, dim=16, num_heads=4)
    with pytest.raises(ValueError,
                       match=re.escape("image_tokens must have shape (B, Ni, 12), got (2, 5, 10)")):
        layer(torch.randn(2, 5, 10), torch.randn(2, 3, 10))
    with pytest.raises(ValueError,
                       match=re.escape("text_tokens must have shape (2, Nt, 10), got (3, 3, 10)")):
        layer(torch.randn(2, 5, 12), torch.randn(3, 3, 10))
    with pytest.raises(ValueError, match=re.escape("text_mask must have shape (B, N) = (2, 3), got (2, 5)")):
        layer(torch.randn(2, 5, 12), torch.randn(2, 3, 10), text_mask=torch.ones(2, 5, dtype=torch.bool))
