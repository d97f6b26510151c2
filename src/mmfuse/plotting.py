"""Figures of mmfuse: one place for the figure set-up, the confusion matrix, curves and attention maps.

Figures are drawn on ``matplotlib.figure.Figure`` objects with the Agg canvas, never through pyplot,
so nothing is left in a global figure registry and no display is needed (the server draws them on
worker threads).

Attention maps show, for one question, where each panel's query (a question word, a latent, or one
head of either) looks in the image. Shapes::

    S  image side    h, w  attention grid    P  panels    K  keys each query attended over

    image: (3, S, S) uint8    AttentionMaps.maps: (P, h, w), each panel's weights on the image positions

To be comparable, all panels share one colour scale (0 to the largest weight of any panel), and the
colour bar marks the uniform level 1/K: a map at that level everywhere looked nowhere in particular.
Such near-uniform panels are labelled as such instead of being stretched into a hot spot. The overlay
dims the image where the weight is low and leaves it untouched where it is high, so the attended
object keeps its own colour.
"""

from __future__ import annotations

import io
import math
import os
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import LinearSegmentedColormap, Normalize
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from torch import Tensor

__all__ = [
    "NEAR_UNIFORM_PEAK",
    "AttentionMaps",
    "attention_figure",
    "confusion_figure",
    "curves_figure",
    "figure_png",
    "near_uniform",
    "new_figure",
    "peak_ratio",
    "save_figure",
    "shared_scale",
]

# A panel whose largest weight is under this multiple of its mean weight counts as near-uniform:
# no position gets even 1.5x its fair share, so there is no focus to show.
NEAR_UNIFORM_PEAK = 1.5
# How dark the overlay makes the image where the weight is 0 (1 = black); the attended region is left as is.
_DIM = 0.6
_DIM_CMAP = LinearSegmentedColormap.from_list("mmfuse_dim", [(0.0, 0.0, 0.0), (1.0, 1.0, 1.0)])
_CONTOUR = "#00e5ff"  # one hue, away from the red/green/blue/yellow of typical shapes
_MAX_LABEL = 14


def new_figure(figsize: tuple[float, float], *, layout: str | None = None) -> Figure:
    """A figure on its own Agg canvas (no pyplot state)."""
    fig = Figure(figsize=figsize, layout=layout)
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig: Figure, path: str | os.PathLike, *, dpi: int = 100) -> Path:
    """Write ``fig`` to ``path`` (format from the suffix), creating the parent directory."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    return path


def figure_png(fig: Figure, *, dpi: int = 100) -> bytes:
    """``fig`` as PNG bytes (for HTTP responses)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


# --------------------------------------------------------------------------------------------------
# curves and confusion matrix


def _is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def curves_figure(rows: Sequence[dict[str, Any]]) -> Figure:
    """Loss and accuracy per epoch: every numeric ``*_loss`` / ``*_accuracy`` key of ``rows``
    (one dict per epoch with an ``epoch`` key), the training series first."""

    def series(suffix: str) -> list[str]:
        keys = {k: None for r in rows for k, v in r.items() if k.endswith(suffix) and _is_number(v)}
        return sorted(keys, key=lambda k: not k.startswith("train"))

    fig = new_figure((10, 4))
    ax_loss, ax_acc = fig.subplots(1, 2)
    for ax, suffix, name in ((ax_loss, "_loss", "loss"), (ax_acc, "_accuracy", "accuracy")):
        for key in series(suffix):
            # Evaluation may run only every few epochs: plot the epochs that have the value.
            points = [(r["epoch"], r[key]) for r in rows if _is_number(r.get(key))]
            ax.plot(*zip(*points, strict=True), marker="o", label=key.replace("_", " "))
        ax.set_xlabel("epoch")
        ax.set_ylabel(name)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend()
    ax_acc.set_ylim(0, 1.02)
    fig.tight_layout()
    return fig


def confusion_figure(counts: Tensor, names: Sequence[str], *, title: str = "") -> Figure:
    """Row-normalised confusion matrix of ``counts`` (A, A) (row = expected, column = predicted)."""
    counts = counts.double()
    norm = counts / counts.sum(dim=1, keepdim=True).clamp_min(1)  # answers never expected stay all-zero
    a = len(names)
    if tuple(counts.shape) != (a, a):
        raise ValueError(f"counts must be (A, A) = ({a}, {a}) for {a} names, got {tuple(counts.shape)}")
    side = max(4.0, 0.45 * a + 2.0)
    fig = new_figure((side + 1.0, side))
    ax = fig.subplots()
    im = ax.imshow(norm.numpy(), cmap="Blues", vmin=0.0, vmax=1.0)
    ax.set_xticks(range(a), names, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(a), names, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("expected")
    if title:
        ax.set_title(title)
    if a <= 20:  # beyond that the numbers no longer fit their cells
        for i in range(a):
            for j in range(a):
                v = float(norm[i, j])
                if v >= 0.005:
                    ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7,
                            color="white" if v > 0.5 else "black")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------------------------------
# attention maps


@dataclass
class AttentionMaps:
    """Attention of one question over the image grid; see the module docstring for shapes.

    ``num_keys`` is the number of keys each query attended over (the image positions, plus the
    text tokens for fusions that attend over both), so ``1 / num_keys`` is the uniform level;
    0 means ``h * w``.
    """

    labels: list[str]  # (P,) the question token, latent or head of each panel
    maps: Tensor  # (P, h, w)
    question: str
    answer: str
    probability: float
    num_keys: int = 0

    @property
    def uniform(self) -> float:
        """The weight of each key under uniform attention."""
        return 1.0 / (self.num_keys or self.maps.shape[-1] * self.maps.shape[-2])


def shared_scale(maps: Tensor) -> tuple[float, float]:
    """``(0, vmax)``: one colour scale for every panel of ``maps`` (P, h, w), vmax its largest weight."""
    return 0.0, max(float(maps.max()), 1e-12) if maps.numel() else 1.0


def peak_ratio(maps: Tensor) -> Tensor:
    """(P,) each panel's largest weight over its mean weight: 1 for a flat map, h*w for a single spot.

    Taken against the panel's own mean, so maps whose rows put only part of their weight on the
    image (the rest on text tokens) compare alike. An all-zero panel gives 1.
    """
    flat = maps.flatten(1).double()  # (P, h*w)
    mean = flat.mean(dim=1)
    return torch.where(mean > 0, flat.max(dim=1).values / mean.clamp_min(1e-300), torch.ones_like(mean))


def near_uniform(maps: Tensor, *, threshold: float = NEAR_UNIFORM_PEAK) -> Tensor:
    """(P,) bool: panels of ``maps`` (P, h, w) whose peak is under ``threshold`` x their mean."""
    return peak_ratio(maps) < threshold


def _short(label: str) -> str:
    return label if len(label) <= _MAX_LABEL else label[: _MAX_LABEL - 1] + "…"


def attention_figure(image: Tensor, maps: AttentionMaps, *, max_columns: int = 6) -> Figure:
    """The image, then one panel per row of ``maps`` on a shared scale, and a colour bar with the
    uniform level marked. ``image``: (3, S, S) uint8."""
    if image.dtype != torch.uint8 or image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"image must be uint8 (3, S, S), got {image.dtype} {tuple(image.shape)}")
    P = len(maps.labels)
    if maps.maps.dim() != 3 or maps.maps.shape[0] != P:
        raise ValueError(f"maps.maps must be (P, h, w) with P = {P} labels, got {tuple(maps.maps.shape)}")
    H, W = image.shape[-2:]
    panels = P + 1  # the image itself first
    nrows = math.ceil(panels / max_columns)
    ncols = math.ceil(panels / nrows)  # balanced rows: 8 panels as 2 x 4, not 6 + 2
    fig = new_figure((2.1 * ncols + 0.9, 2.35 * nrows + 0.9), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    rgb = image.permute(1, 2, 0).numpy()  # (S, S, 3)

    vmin, vmax = shared_scale(maps.maps)
    uniform = maps.uniform
    heat = F.interpolate(maps.maps.float()[:, None], size=(H, W), mode="bilinear", align_corners=False)[:, 0]
    flat = near_uniform(maps.maps)
    ratios = peak_ratio(maps.maps)

    first = axes.flat[0]
    first.imshow(rgb)
    first.set_title("image", fontsize=9)
    first.axis("off")
    for ax, label, m, is_flat, ratio in zip(axes.flat[1:], maps.labels, heat, flat, ratios, strict=False):
        ax.axis("off")
        if bool(is_flat):
            # No focus to show: the plain image, uniformly dimmed, and a label instead of a hot spot.
            ax.imshow(rgb)
            shade = np.zeros((H, W, 4))
            shade[..., 3] = _DIM * 0.5
            ax.imshow(shade, interpolation="nearest")
            ax.text(0.5, 0.5, "near-uniform", transform=ax.transAxes, ha="center", va="center",
                    fontsize=9, color="white", fontweight="bold")
            ax.set_title(f"{_short(label)}\nno focus", fontsize=9)
            continue
        level = (m / vmax).clamp(0, 1).numpy()  # shared scale
        mask = np.zeros((H, W, 4))
        mask[..., 3] = _DIM * (1.0 - level)  # dark where the weight is low, clear where it is high
        ax.imshow(rgb)
        ax.imshow(mask, interpolation="bilinear")
        if float(m.max()) > uniform:  # outline the positions above the uniform level
            ax.contour(m.numpy(), levels=[uniform], colors=_CONTOUR, linewidths=1.0)
        ax.set_title(f"{_short(label)}\npeak {float(ratio):.1f}x mean", fontsize=9)
    for ax in axes.flat[panels:]:
        ax.remove()

    bar = fig.colorbar(ScalarMappable(Normalize(vmin, vmax), cmap=_DIM_CMAP), ax=list(axes.flat[:panels]), shrink=0.8,
                       fraction=0.03, pad=0.02)
    bar.set_label("attention weight (darker = less)", fontsize=8)
    bar.ax.tick_params(labelsize=7)
    if uniform <= vmax:
        bar.ax.axhline(uniform, color=_CONTOUR, linewidth=2)
        bar.ax.text(-0.3, uniform, f"uniform 1/{round(1 / uniform)}", transform=bar.ax.get_yaxis_transform(),
                    ha="right", va="center", fontsize=7, color="black")
    question = textwrap.fill(f"Q: {maps.question}", width=max(30, 14 * ncols))
    fig.suptitle(f"{question}\nA: {maps.answer} ({maps.probability:.0%}); outline: above uniform",
                 fontsize=10)
    return fig
