from __future__ import annotations

import pytest
import torch
from torch import nn

from mmfuse.encoders.resnet import BasicBlock, Bottleneck, ResNet

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.mark.parametrize(("depth", "published"), [(18, 11_689_512), (50, 25_557_032)])
def test_parameter_count_with_a_1000_class_head_matches_the_published_one(depth, published):
    # 11.7M and 25.6M (He et al. 2016; torchvision's resnet18 / resnet50 counts, to the parameter).
    encoder = ResNet(depth)
    head = nn.Linear(encoder.out_dim, 1000)
    total = sum(p.numel() for p in (*encoder.parameters(), *head.parameters()))
    assert total == published


@pytest.mark.parametrize("depth", [18, 50])
def test_shapes_tokens_and_grids(depth):
    encoder = ResNet(depth, width=0.125).eval()
    images = torch.randn(2, 3, 64, 64)
    tokens = encoder(images)
    assert tokens.shape == (2, 2 * 2, encoder.out_dim)  # 64 / 32 = 2
    assert encoder.out_dim == encoder.stage_channels[-1] == (64 if depth == 18 else 256)
    x = images
    for level, block in enumerate(encoder.blocks, start=1):
        x = block(x)
        assert tuple(x.shape[-2:]) == encoder.grid(64, level) == (64 >> level,) * 2
        assert x.shape[1] == encoder.stage_channels[level - 1]
    assert encoder.grid(224) == (7, 7)
    assert encoder.grid(33) == (2, 2)  # padded strides round up
    assert encoder(torch.randn(1, 3, 33, 33)).shape == (1, 4, encoder.out_dim)


@pytest.mark.parametrize("block_type", [BasicBlock, Bottleneck])
def test_zero_init_makes_a_residual_block_the_identity(block_type):
    torch.manual_seed(0)
    encoder = ResNet(18 if block_type is BasicBlock else 50, width=0.25)
    blocks = [m for m in encoder.modules() if isinstance(m, block_type)]
    same_shape = [b for b in blocks if isinstance(b.shortcut, nn.Identity)]
    assert same_shape
    block = same_shape[0].eval()
    x = torch.rand(2, block.branch[0].in_channels, 8, 8)  # >= 0: what a ReLU hands the block
    torch.testing.assert_close(block(x), x)
    # ...and not the identity once the last BatchNorm has a scale, so the test can fail
    nn.init.ones_(block.last_bn.weight)
    assert not torch.allclose(block(x), x)


def test_without_zero_init_blocks_are_not_the_identity():
    encoder = ResNet(18, width=0.25, zero_init_residual=False)
    assert all(bool((m.weight != 0).all()) for m in encoder.modules() if isinstance(m, nn.BatchNorm2d))


def test_bad_arguments():
    with pytest.raises(ValueError, match="depth"):
        ResNet(34)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="width"):
        ResNet(18, width=0)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        ResNet(18, width=0.125)(torch.randn(3, 64, 64))
