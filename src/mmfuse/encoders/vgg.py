"""VGG image encoders (VGG11 / VGG16, Simonyan & Zisserman 2015), written with torch only.

They are :class:`~mmfuse.encoders.vision.ConvEncoder` s with VGG's block layout.

VGG16 on a 224x224 image gives 7x7 = 49 tokens; shapes and token order as in
:mod:`mmfuse.encoders.vision`.
"""

from __future__ import annotations

from typing import Literal

from mmfuse.encoders.vision import ConvEncoder

__all__ = ["VGG", "VGG_CHANNELS"]

# Output channels of the conv layers of each block, before the width multiplier.
VGG_CHANNELS: dict[int, tuple[tuple[int, ...], ...]] = {
    11: ((64,), (128,), (256, 256), (512, 512), (512, 512)),
    16: ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512)),
}


class VGG(ConvEncoder):
    """VGG feature extractor returning tokens (B, h*w, out_dim) with learned 2-D positions.

    Args:
        depth: 11 (8 conv layers) or 16 (13 conv layers), in 5 blocks each ending in a 2x2 max-pool.
        batch_norm: BatchNorm after every conv (the ``vgg*_bn`` variants).
        in_channels: image channels.
        width: channel multiplier (0.125 gives 8..64 channels: fast enough for tests and CPU runs).
        pos_embed: add a :class:`PositionalEmbedding2d` to the output tokens.
        num_stages: keep only the first ``num_stages`` blocks (1..5); the grid shrinks by 2 per block.
        image_size: the image size the positional tables are sized for; other sizes interpolate them.
    """

    def __init__(self, depth: Literal[11, 16] = 16, *, batch_norm: bool = False, in_channels: int = 3,
                 width: float = 1.0, pos_embed: bool = True, num_stages: int = 5,
                 image_size: int = 224) -> None:
        if depth not in VGG_CHANNELS:
            raise ValueError(f"depth must be one of {sorted(VGG_CHANNELS)}, got {depth!r}")
        if not 1 <= num_stages <= 5:
            raise ValueError(f"num_stages must be in 1..5, got {num_stages}")
        if width <= 0:
            raise ValueError(f"width must be positive, got {width}")
        stages = [[max(1, round(c * width)) for c in block] for block in VGG_CHANNELS[depth][:num_stages]]
        super().__init__(stages, batch_norm=batch_norm, in_channels=in_channels, pos_embed=pos_embed,
                         image_size=image_size)
        self.depth = depth
