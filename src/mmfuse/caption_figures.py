"""Where a caption decoder looked: the image, then one overlay per generated word.

``plot_word_attention(model, image, tokens, attention, path)`` draws a row of panels: the image, then for
each generated token (``<eos>`` included, when generated) the decoder's cross-attention over the image
grid while it wrote that token, averaged over heads and blocks, upsampled onto the image.

Shapes::

    image: (3, S, S) uint8    tokens: T ids    attention: (T, N) over the context, whose first h*w entries
    are the image grid (row-major, see :func:`mmfuse.encoders.vision.feature_map_to_tokens`)
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["plot_word_attention", "word_attention_grids"]


def word_attention_grids(model: Any, attention: Tensor) -> Tensor:
    """(T, N) attention -> (T, h, w) over the image grid (question tokens of the context dropped)."""
    if model.pool is not None:
        raise ValueError("the decoder attends over pooled latents (pool_queries > 0), not image positions: "
                         "no map over the image to draw")
    h, w = model.vision.grid(model.config.image_size)
    if attention.dim() != 2 or attention.shape[1] < h * w:
        raise ValueError(f"attention must be (T, N >= {h * w}), got {tuple(attention.shape)}")
    return attention[:, :h * w].reshape(-1, h, w)


def plot_word_attention(model: Any, image: Tensor, tokens: Sequence[int], attention: Tensor,
                        path: str | os.PathLike, *, columns: int = 6) -> None:
    """Write the figure of the module docstring to ``path`` (PNG, PDF... by extension)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tokenizer = model.tokenizer
    tokens = [int(t) for t in tokens]
    if tokenizer.eos_id in tokens:  # the words up to <eos>, which is drawn too; padding after it is not
        tokens = tokens[:tokens.index(tokenizer.eos_id) + 1]
    grids = word_attention_grids(model, attention.float())[:len(tokens)]  # (T, h, w)
    size = image.shape[-1]
    maps = F.interpolate(grids[:, None], size=(size, size), mode="bilinear", align_corners=False)[:, 0]
    words = ["<eos>" if t == tokenizer.eos_id else tokenizer.token(t) for t in tokens]
    panels = 1 + len(words)
    cols = min(columns, panels)
    rows = math.ceil(panels / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.0 * cols, 2.2 * rows), squeeze=False)
    picture = image.permute(1, 2, 0).numpy()
    for ax in axes.flat:
        ax.axis("off")
    axes[0, 0].imshow(picture)
    axes[0, 0].set_title("image", fontsize=9)
    for i, (word, heat) in enumerate(zip(words, maps, strict=True), start=1):
        ax = axes[i // cols, i % cols]
        ax.imshow(picture)
        ax.imshow(heat.numpy(), cmap="jet", alpha=0.5, vmin=0.0, vmax=float(torch.clamp(heat.max(), min=1e-6)))
        ax.set_title(f"{i}. {word}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
