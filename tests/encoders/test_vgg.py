import pytest
import torch
from torch import nn

from mmfuse.encoders.vgg import VGG
from mmfuse.encoders.vision import PositionalEmbedding2d, feature_map_to_tokens, tokens_to_feature_map


def _num_convs(model: nn.Module) -> int:
    return sum(isinstance(m, nn.Conv2d) for m in model.modules())


@pytest.mark.parametrize(("depth", "convs"), [(11, 8), (16, 13)])
def test_conv_layer_count(depth, convs):
    assert _num_convs(VGG(depth, width=0.125)) == convs


def test_full_width_vgg16_channels_and_parameters():
    model = VGG(16, pos_embed=False)
    assert model.stage_channels == (64, 128, 256, 512, 512)
    assert model.out_dim == 512
    # The 13 conv layers of torchvision's vgg16().features: 14,714,688 parameters.
    assert sum(p.numel() for p in model.parameters()) == 14_714_688


def test_batch_norm_variant():
    model = VGG(16, width=0.125, batch_norm=True)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 13
    assert all(m.bias is None for m in model.modules() if isinstance(m, nn.Conv2d))


def test_token_shape_224():
    torch.manual_seed(0)
    model = VGG(16, width=0.125)
    tokens = model(torch.randn(2, 3, 224, 224))
    assert tokens.shape == (2, 49, model.out_dim) == (2, 49, 64)
    assert model.grid(224) == (7, 7)


def test_stages_halve():
    model = VGG(16, width=0.125)
    stages = model.forward_features(torch.randn(1, 3, 64, 64), return_stages=True)
    assert [tuple(s.shape) for s in stages] == [
        (1, 8, 32, 32), (1, 16, 16, 16), (1, 32, 8, 8), (1, 64, 4, 4), (1, 64, 2, 2),
    ]
    assert [model.grid(64, stage) for stage in range(1, 6)] == [(32, 32), (16, 16), (8, 8), (4, 4), (2, 2)]


def test_num_stages_truncates():
    model = VGG(16, width=0.125, num_stages=3)
    assert len(model.blocks) == 3 and model.out_dim == 32
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 16, 32)


def test_flatten_order(monkeypatch):
    """Token i*w + j must carry position (i, j) with its channels in order (a view(B, -1, C) would not)."""
    model = VGG(16, width=0.125, pos_embed=False)
    C, h, w = model.out_dim, 3, 5
    feat = torch.zeros(2, C, h, w)
    feat[1, :, 2, 4] = torch.arange(1.0, C + 1)
    monkeypatch.setattr(model, "forward_features", lambda images: feat)
    tokens = model(torch.zeros(2, 3, 32, 32))
    assert tokens.shape == (2, h * w, C)
    hit = (tokens != 0).any(-1).nonzero().tolist()
    assert hit == [[1, 2 * w + 4]]
    torch.testing.assert_close(tokens[1, 2 * w + 4], torch.arange(1.0, C + 1))
    torch.testing.assert_close(tokens_to_feature_map(feature_map_to_tokens(feat), h, w), feat)


def test_positional_embedding_makes_tokens_position_dependent():
    torch.manual_seed(0)
    plain = VGG(16, width=0.125, pos_embed=False)
    with_pos = VGG(16, width=0.125, pos_embed=True)
    with_pos.load_state_dict(plain.state_dict(), strict=False)
    images = torch.zeros(1, 3, 64, 64)  # zero image, zero biases: every position gets the same features
    flat = plain(images)
    assert torch.equal(flat, flat[:, :1].expand_as(flat))
    tokens = with_pos(images)[0]  # (4, C)
    assert torch.cdist(tokens, tokens).add(torch.eye(len(tokens))).min() > 0  # pairwise distinct
    torch.testing.assert_close(tokens - flat[0], with_pos.pos_embed(2, 2))


def test_positional_embedding_interpolates_to_other_grids():
    torch.manual_seed(0)
    pos = PositionalEmbedding2d(4, (7, 7))
    table = pos(7, 7).reshape(7, 7, 4)
    torch.testing.assert_close(table[2, 3], pos.row[2] + pos.col[3])
    assert pos(3, 5).shape == (15, 4)
    # A 1x1 grid samples the centre of the 7x7 tables (align_corners=False keeps cell centres aligned).
    torch.testing.assert_close(pos(1, 1)[0], pos.row[3] + pos.col[3])
    # Upsampling 7 -> 14 keeps the ends: cell 0 of 14 sits at 7-grid coordinate -0.25, clamped to 0.
    torch.testing.assert_close(pos(14, 14)[0], pos.row[0] + pos.col[0])


def test_other_image_size_uses_interpolated_positions():
    model = VGG(11, width=0.125, image_size=64)
    assert model.pos_embed.row.shape == (2, model.out_dim)
    assert model(torch.randn(1, 3, 96, 128)).shape == (1, 3 * 4, model.out_dim)


def test_init_is_kaiming():
    torch.manual_seed(0)
    model = VGG(16, pos_embed=False)
    conv = model.blocks[3][0]  # 256 -> 512 channels: fan_out = 512 * 9
    assert conv.weight.std().item() == pytest.approx((2 / (512 * 9)) ** 0.5, rel=0.02)
    assert torch.count_nonzero(conv.bias) == 0


def test_bad_inputs_name_the_shape():
    model = VGG(16, width=0.125)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        model(torch.randn(2, 1, 64, 64))
    with pytest.raises(ValueError, match="at least 32x32"):
        model(torch.randn(2, 3, 16, 16))
    with pytest.raises(ValueError, match="depth"):
        VGG(19)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="too small"):
        model.grid(16)


def test_backward_reaches_first_conv():
    model = VGG(11, width=0.125)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    assert model.blocks[0][0].weight.grad.abs().sum() > 0
    assert model.pos_embed.row.grad is not None
