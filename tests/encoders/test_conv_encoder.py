from __future__ import annotations

import re

import pytest
import torch

from mmfuse.encoders.vision import ConvEncoder

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.mark.parametrize("coordinates", [False, True])
def test_coordinate_channels_tell_positions_apart(coordinates):
    """On a blank image, interior cells of a plain CNN (no positional table) are identical: convolutions
    are translation-equivariant. Coordinate channels make every cell's features depend on where it is."""
    torch.manual_seed(0)
    enc = ConvEncoder(((8,), (8,)), batch_norm=False, pos_embed=False, image_size=32, coordinates=coordinates).eval()
    assert enc.blocks[0][0].in_channels == (5 if coordinates else 3) and enc.in_channels == 3
    tokens = enc(torch.full((1, 3, 32, 32), 0.5))  # (1, 8 * 8, 8)
    assert tokens.shape == (1, 64, 8)
    a, b = tokens[0, 2 * 8 + 2], tokens[0, 5 * 8 + 5]  # two interior cells, far from the zero padding
    assert torch.allclose(a, b) != coordinates
    with pytest.raises(ValueError, match=re.escape("images must have shape (B, 3, H, W), got (1, 5, 32, 32)")):
        enc(torch.zeros(1, 5, 32, 32))
