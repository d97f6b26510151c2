"""Convolutional image encoders that return tokens, one per feature-map position.

A vision encoder in mmfuse returns a sequence of tokens, never a pooled vector: attention needs real
positions to attend over (a 64x64 easy-VQA image through three stages gives 8x8 = 64 tokens, VGG16
on 224x224 gives 7x7 = 49).

Shapes::

    B   batch             C   channels of a feature map (``out_dim`` for the last one)
    H, W  image size      h, w  feature-map grid (``grid(image_size)``)

    images: (B, 3, H, W), already normalised    tokens: (B, h*w, out_dim), row-major positions

Tokens are ``feat.flatten(2).transpose(1, 2)``: token ``i * w + j`` is feature-map position (i, j)
with all of its channels. (``feat.view(B, -1, C)`` would interleave channels and positions.)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ConvEncoder", "PositionalEmbedding2d", "feature_map_to_tokens", "tokens_to_feature_map"]


def feature_map_to_tokens(feat: Tensor) -> Tensor:
    """(B, C, h, w) -> (B, h*w, C), position (i, j) becoming token i * w + j."""
    return feat.flatten(2).transpose(1, 2)


def tokens_to_feature_map(tokens: Tensor, h: int, w: int) -> Tensor:
    """Inverse of :func:`feature_map_to_tokens`: (B, h*w, C) -> (B, C, h, w)."""
    B, N, C = tokens.shape
    if N != h * w:
        raise ValueError(f"expected {h}*{w} = {h * w} tokens for a {h}x{w} grid, got {N}")
    return tokens.transpose(1, 2).reshape(B, C, h, w)


class PositionalEmbedding2d(nn.Module):
    """Learned 2-D positional embedding, factorised as ``pos[i, j] = row[i] + col[j]``.

    The two tables are sized for a reference ``grid`` (the feature map of the training image size).
    For another grid size each table is linearly interpolated along its own axis, so one model serves
    any image size; positions keep their relative meaning (top row stays top row).

    ``forward(h, w)`` returns (h*w, dim) in the row-major order of :func:`feature_map_to_tokens`.
    """

    def __init__(self, dim: int, grid: tuple[int, int]) -> None:
        super().__init__()
        if grid[0] < 1 or grid[1] < 1:
            raise ValueError(f"grid must be at least 1x1, got {grid}")
        self.dim = dim
        self.row = nn.Parameter(torch.empty(grid[0], dim))
        self.col = nn.Parameter(torch.empty(grid[1], dim))
        self.init_weights()

    def init_weights(self) -> None:
        nn.init.trunc_normal_(self.row, std=0.02)
        nn.init.trunc_normal_(self.col, std=0.02)

    @staticmethod
    def _resize(table: Tensor, size: int) -> Tensor:
        if table.shape[0] == size:
            return table
        # (n, dim) -> (1, dim, n) for 1-D interpolation along the positions.
        return F.interpolate(table.T[None], size=size, mode="linear", align_corners=False)[0].T

    def forward(self, h: int, w: int) -> Tensor:
        row = self._resize(self.row, h)  # (h, dim)
        col = self._resize(self.col, w)  # (w, dim)
        return (row[:, None, :] + col[None, :, :]).reshape(h * w, self.dim)  # (h*w, dim)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, grid=({self.row.shape[0]}, {self.col.shape[0]})"


class ConvEncoder(nn.Module):
    """A stack of conv blocks (3x3 convs, optional BatchNorm, ReLU, then a 2x2 max-pool) -> tokens.

    Args:
        stages: output channels of the convs of each block, e.g. ``((32,), (64,), (128,))``.
        batch_norm: BatchNorm after every conv.
        in_channels: image channels.
        pos_embed: add a :class:`PositionalEmbedding2d` to the output tokens.
        image_size: the image size the positional tables are sized for; other sizes interpolate them.
        coordinates: append two channels to the image, each pixel's x and y in [-1, 1] (CoordConv, Liu et
            al. 2018), so the features can say exactly where in the image they are, which max-pooled
            convolutions otherwise blur to the cell.
    """

    def __init__(self, stages: Sequence[Sequence[int]] = ((32,), (64,), (128,)), *, batch_norm: bool = True,
                 in_channels: int = 3, pos_embed: bool = True, image_size: int = 64,
                 coordinates: bool = False) -> None:
        super().__init__()
        if not stages or any(not block for block in stages):
            raise ValueError(f"stages must be a non-empty list of non-empty channel lists, got {stages!r}")
        self.in_channels = in_channels
        self.num_stages = len(stages)
        self.coordinates = coordinates

        blocks = []
        channels = []
        c_in = in_channels + (2 if coordinates else 0)
        for block_channels in stages:
            layers: list[nn.Module] = []
            for c_out in block_channels:
                layers.append(nn.Conv2d(c_in, c_out, kernel_size=3, padding=1, bias=not batch_norm))
                if batch_norm:
                    layers.append(nn.BatchNorm2d(c_out))
                layers.append(nn.ReLU(inplace=True))
                c_in = c_out
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            blocks.append(nn.Sequential(*layers))
            channels.append(c_in)
        self.blocks = nn.ModuleList(blocks)
        self.stage_channels: tuple[int, ...] = tuple(channels)
        self.out_dim = channels[-1]
        self.pos_embed = PositionalEmbedding2d(self.out_dim, self.grid(image_size)) if pos_embed else None
        self.init_weights()

    def init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if self.pos_embed is not None:
            self.pos_embed.init_weights()

    def grid(self, image_size: int, stage: int | None = None) -> tuple[int, int]:
        """(h, w) of the feature map after block ``stage`` (1-based; default: the last) for a square image."""
        stage = self.num_stages if stage is None else stage
        if not 1 <= stage <= self.num_stages:
            raise ValueError(f"stage must be in 1..{self.num_stages}, got {stage}")
        size = image_size
        for _ in range(stage):
            size //= 2  # each max-pool floors
        if size < 1:
            raise ValueError(
                f"image_size {image_size} is too small for {stage} conv blocks: need at least {2**stage}"
            )
        return size, size

    def check_images(self, images: Tensor) -> None:
        """Raise ``ValueError`` unless ``images`` is (B, in_channels, H, W) and large enough."""
        if images.dim() != 4 or images.shape[1] != self.in_channels:
            raise ValueError(
                f"images must have shape (B, {self.in_channels}, H, W), got {tuple(images.shape)}"
            )
        if min(images.shape[-2:]) < 2**self.num_stages:
            raise ValueError(
                f"images must be at least {2**self.num_stages}x{2**self.num_stages} for {self.num_stages} "
                f"conv blocks, got {tuple(images.shape[-2:])}"
            )

    def forward_features(self, images: Tensor, *, return_stages: bool = False) -> Tensor | list[Tensor]:
        """The last feature map (B, out_dim, h, w), or every block's map [(B, C_i, H_i, W_i)]."""
        self.check_images(images)
        x = images
        if self.coordinates:
            B, _, H, W = images.shape
            y, x_ = torch.meshgrid(torch.linspace(-1, 1, H, device=images.device, dtype=images.dtype),
                                   torch.linspace(-1, 1, W, device=images.device, dtype=images.dtype), indexing="ij")
            x = torch.cat([images, x_.expand(B, 1, H, W), y.expand(B, 1, H, W)], dim=1)  # (B, C + 2, H, W)
        # Channels-last (NHWC) memory: oneDNN's convolution, batch norm and max-pool run on it without
        # reordering; on a 2-core CPU the default encoder's forward+backward over 32 images took 28-31 ms
        # against 45-50 ms in NCHW (benchmarks/README.md, "training step"). The tokens come out contiguous.
        x = x.contiguous(memory_format=torch.channels_last)
        stages = []
        for block in self.blocks:
            x = block(x)  # (B, C_i, H_{i-1} // 2, W_{i-1} // 2)
            stages.append(x)
        return stages if return_stages else x

    def forward(self, images: Tensor) -> Tensor:
        feat = self.forward_features(images)  # (B, C, h, w)
        tokens = feature_map_to_tokens(feat)  # (B, h*w, C)
        if self.pos_embed is not None:
            tokens = tokens + self.pos_embed(*feat.shape[-2:])
        return tokens
