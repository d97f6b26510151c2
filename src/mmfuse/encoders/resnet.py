"""ResNet-18 / ResNet-50 image encoders (He et al. 2016), written with torch only.

The network is cut into five blocks that each halve the grid, like VGG's, so a classifier can treat both
backbones alike (``blocks``, ``stage_channels``, ``grid(image_size, level)``):

    block 1: 7x7 conv, stride 2, BatchNorm, ReLU                    (H/2)
    block 2: 3x3 max-pool, stride 2, then ``layer1``                (H/4)
    block 3..5: ``layer2`` .. ``layer4``, each starting at stride 2  (H/8, H/16, H/32)

A 224x224 image gives a 7x7 grid (49 tokens) after block 5, as VGG16 does.

Shapes::

    images: (B, in_channels, H, W), already normalised    tokens: (B, h*w, out_dim), row-major positions

``zero_init_residual`` (default) starts the last BatchNorm of every residual branch at zero, so each
residual block begins as the identity on its input (after the final ReLU) and a deep network trains like
a shallow one at first (Goyal et al. 2017).
"""

from __future__ import annotations

from typing import Literal

from torch import Tensor, nn

from mmfuse.encoders.vision import PositionalEmbedding2d, feature_map_to_tokens

__all__ = ["RESNET_LAYERS", "BasicBlock", "Bottleneck", "ResNet"]

# (block type, residual blocks per layer1..layer4)
RESNET_LAYERS: dict[int, tuple[str, tuple[int, int, int, int]]] = {
    18: ("basic", (2, 2, 2, 2)),
    50: ("bottleneck", (3, 4, 6, 3)),
}


def _conv_bn(c_in: int, c_out: int, kernel: int, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=kernel // 2, bias=False), nn.BatchNorm2d(c_out)]


class _Residual(nn.Module):
    """``relu(branch(x) + shortcut(x))``; the shortcut is a strided 1x1 conv + BN where the shape changes."""

    expansion = 1

    def __init__(self, branch: nn.Sequential, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.branch = branch
        self.shortcut = (nn.Sequential(*_conv_bn(c_in, c_out, 1, stride)) if stride != 1 or c_in != c_out
                         else nn.Identity())
        self.relu = nn.ReLU(inplace=True)

    @property
    def last_bn(self) -> nn.BatchNorm2d:
        return self.branch[-1]

    def forward(self, x: Tensor) -> Tensor:
        return self.relu(self.branch(x) + self.shortcut(x))


class BasicBlock(_Residual):
    """Two 3x3 convs (ResNet-18/34); ``width`` channels out."""

    expansion = 1

    def __init__(self, c_in: int, width: int, stride: int = 1) -> None:
        branch = nn.Sequential(*_conv_bn(c_in, width, 3, stride), nn.ReLU(inplace=True), *_conv_bn(width, width, 3))
        super().__init__(branch, c_in, width, stride)


class Bottleneck(_Residual):
    """1x1 reduce, 3x3 (strided, as torchvision's "ResNet v1.5"), 1x1 expand to ``4 * width`` (ResNet-50)."""

    expansion = 4

    def __init__(self, c_in: int, width: int, stride: int = 1) -> None:
        c_out = width * self.expansion
        branch = nn.Sequential(*_conv_bn(c_in, width, 1), nn.ReLU(inplace=True),
                               *_conv_bn(width, width, 3, stride), nn.ReLU(inplace=True),
                               *_conv_bn(width, c_out, 1))
        super().__init__(branch, c_in, c_out, stride)


class ResNet(nn.Module):
    """ResNet feature extractor returning tokens (B, h*w, out_dim); see the module docstring.

    Args:
        depth: 18 (basic blocks) or 50 (bottlenecks).
        in_channels: image channels.
        width: channel multiplier (0.25 gives 16..128 channels for ResNet-18: CPU-sized).
        pos_embed: add a learned :class:`PositionalEmbedding2d` to the output tokens.
        image_size: the image size the positional tables are sized for.
        zero_init_residual: start every residual branch's last BatchNorm scale at zero.
    """

    def __init__(self, depth: Literal[18, 50] = 18, *, in_channels: int = 3, width: float = 1.0,
                 pos_embed: bool = False, image_size: int = 224, zero_init_residual: bool = True) -> None:
        super().__init__()
        if depth not in RESNET_LAYERS:
            raise ValueError(f"depth must be one of {sorted(RESNET_LAYERS)}, got {depth!r}")
        if width <= 0:
            raise ValueError(f"width must be positive, got {width}")
        kind, counts = RESNET_LAYERS[depth]
        block_type = BasicBlock if kind == "basic" else Bottleneck
        self.depth = depth
        self.in_channels = in_channels
        self.num_stages = 5
        self.zero_init_residual = zero_init_residual

        stem = max(1, round(64 * width))
        blocks: list[nn.Module] = [nn.Sequential(*_conv_bn(in_channels, stem, 7, 2), nn.ReLU(inplace=True))]
        channels = [stem]
        c_in = stem
        for i, n in enumerate(counts):
            planes = max(1, round(64 * 2**i * width))
            layer: list[nn.Module] = [nn.MaxPool2d(3, stride=2, padding=1)] if i == 0 else []
            for j in range(n):
                stride = 2 if i > 0 and j == 0 else 1
                layer.append(block_type(c_in, planes, stride))
                c_in = planes * block_type.expansion
            blocks.append(nn.Sequential(*layer))
            channels.append(c_in)
        self.blocks = nn.ModuleList(blocks)
        self.stage_channels: tuple[int, ...] = tuple(channels)
        self.out_dim = c_in
        self.pos_embed = PositionalEmbedding2d(self.out_dim, self.grid(image_size)) if pos_embed else None
        self.init_weights()

    def init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if self.zero_init_residual:
            for m in self.modules():
                if isinstance(m, _Residual):
                    nn.init.zeros_(m.last_bn.weight)
        if self.pos_embed is not None:
            self.pos_embed.init_weights()

    def grid(self, image_size: int, stage: int | None = None) -> tuple[int, int]:
        """(h, w) after block ``stage`` (1-based; default: the last) for a square ``image_size`` image."""
        stage = self.num_stages if stage is None else stage
        if not 1 <= stage <= self.num_stages:
            raise ValueError(f"stage must be in 1..{self.num_stages}, got {stage}")
        size = image_size
        for _ in range(stage):
            size = (size + 1) // 2  # stride-2 convs / pools with padding round up
        return size, size

    def check_images(self, images: Tensor) -> None:
        if images.dim() != 4 or images.shape[1] != self.in_channels:
            raise ValueError(f"images must have shape (B, {self.in_channels}, H, W), got {tuple(images.shape)}")

    def forward_features(self, images: Tensor) -> Tensor:
        """The last feature map (B, out_dim, h, w)."""
        self.check_images(images)
        x = images
        for block in self.blocks:
            x = block(x)  # (B, C_l, ceil(H_{l-1} / 2), ceil(W_{l-1} / 2))
        return x

    def forward(self, images: Tensor) -> Tensor:
        feat = self.forward_features(images)  # (B, C, h, w)
        tokens = feature_map_to_tokens(feat)  # (B, h*w, C)
        if self.pos_embed is not None:
            tokens = tokens + self.pos_embed(*feat.shape[-2:])
        return tokens
