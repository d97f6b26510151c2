"""Figures and a markdown report for a training run: curves, confusion matrix, attention maps.

Figures are drawn on ``matplotlib.figure.Figure`` objects with the Agg canvas, never through pyplot,
so nothing is left in a global figure registry and no display is needed.

Attention maps show, for one question, where each question token (or each latent query of
``attention_pooling``) looks in the image: the fusion's cross-modal attention weights, averaged over
heads, laid back on the vision encoder's feature grid and upsampled over the image. Shapes::

    S  image side    h, w  vision grid (``model.vision.grid(S)``)    P  panels (tokens or latents)

    image: (3, S, S) uint8    AttentionMaps.maps: (P, h, w), weights of each panel's image positions
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from torch import Tensor

from mmfuse.data import VQASplit, load_split
from mmfuse.data.vocab import CLS
from mmfuse.evaluate import EvalResult, evaluate
from mmfuse.io import atomic_write_text, read_json
from mmfuse.models.vqa import VQAModel

__all__ = [
    "AttentionMaps",
    "attention_figure",
    "attention_map",
    "attention_maps",
    "attention_unavailable",
    "plot_confusion",
    "plot_training_curves",
    "read_metrics",
    "write_report",
]

NO_ATTENTION = frozenset({"concat", "late", "product", "text_only", "image_only"})
MAX_LATENTS = 8  # attention_pooling may have dozens of latents; the first few show the pattern
_FIGURES = "figures"


def _new_figure(figsize: tuple[float, float]) -> Figure:
    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path


# --------------------------------------------------------------------------------------------------
# training curves and confusion matrix


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The rows of a ``metrics.jsonl`` (one JSON object per epoch); ``ValueError`` if there are none."""
    path = Path(path)
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not rows:
        raise ValueError(f"{path}: no metrics rows")
    return rows


def _is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _series(rows: list[dict[str, Any]], suffix: str) -> list[str]:
    """Numeric keys ending in ``suffix`` ("_loss", "_accuracy"), the training one first."""
    keys = {k: None for r in rows for k, v in r.items() if k.endswith(suffix) and _is_number(v)}
    return sorted(keys, key=lambda k: not k.startswith("train"))


def plot_training_curves(metrics_path: str | os.PathLike, out_png: str | os.PathLike) -> Path:
    """Loss and accuracy per epoch (training, and every evaluated split present) from ``metrics.jsonl``."""
    rows = read_metrics(metrics_path)
    fig = _new_figure((10, 4))
    ax_loss, ax_acc = fig.subplots(1, 2)
    for ax, suffix, name in ((ax_loss, "_loss", "loss"), (ax_acc, "_accuracy", "accuracy")):
        for key in _series(rows, suffix):
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
    return _save(fig, out_png)


def plot_confusion(result: EvalResult, out_png: str | os.PathLike) -> Path:
    """Row-normalised confusion matrix (row = expected answer, column = predicted) with answer names."""
    counts = result.confusion().double()  # (A, A)
    norm = counts / counts.sum(dim=1, keepdim=True).clamp_min(1)  # answers never expected stay all-zero
    names = result.answer_names
    a = len(names)
    side = max(4.0, 0.45 * a + 2.0)
    fig = _new_figure((side + 1.0, side))
    ax = fig.subplots()
    im = ax.imshow(norm.numpy(), cmap="Blues", vmin=0.0, vmax=1.0)
    ax.set_xticks(range(a), names, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(a), names, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("expected")
    ax.set_title(f"{result.split.name}: accuracy {result.accuracy:.2%}")
    if a <= 20:  # beyond that the numbers no longer fit their cells
        for i in range(a):
            for j in range(a):
                v = float(norm[i, j])
                if v >= 0.005:
                    ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7,
                            color="white" if v > 0.5 else "black")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    return _save(fig, out_png)


# --------------------------------------------------------------------------------------------------
# attention maps


@dataclass
class AttentionMaps:
    """Head-averaged attention of one question over the image grid; see the module docstring."""

    labels: list[str]  # (P,) the question token or latent of each panel
    maps: Tensor  # (P, h, w)
    question: str
    answer: str
    probability: float


def attention_unavailable(model: VQAModel) -> str | None:
    """Why ``model`` cannot give attention maps, or None when it can."""
    c = model.config
    if c.fusion in NO_ATTENTION:
        return f"fusion {c.fusion} has no attention to show"
    if c.impl not in ("auto", "math"):
        return (f"the model uses impl={c.impl!r}, which computes no attention weights; attention maps need a "
                "model trained with impl 'auto' or 'math'")
    if not hasattr(model.vision, "grid"):  # hf: backbones (class tokens), precomputed features
        return f"the image tokens of vision {c.vision!r} are not laid out on a known grid, so there is no map to draw"
    if c.pool_queries > 0:
        return (f"the image tokens are {c.pool_queries} pooled latents (pool_queries={c.pool_queries}), not "
                "image positions, so there is no map to draw; use a model with pool_queries=0")
    return None


def _token_labels(model: VQAModel, ids: list[int]) -> list[str]:
    tokenizer = model.text.tokenizer
    if hasattr(tokenizer, "convert_ids_to_tokens"):  # Hugging Face tokenizers
        return list(tokenizer.convert_ids_to_tokens(ids))
    return ["<cls>" if i == CLS else tokenizer.decode([i]) for i in ids]


@torch.no_grad()
def attention_maps(model: VQAModel, image: Tensor, question: str) -> AttentionMaps:
    """The attention of ``question``'s tokens (latents for ``attention_pooling``) over ``image``.

    Raises ``ValueError`` for fusions without attention, for implementations that give no weights and
    for models whose image tokens are pooled latents (see :func:`attention_unavailable`).
    """
    reason = attention_unavailable(model)
    if reason:
        raise ValueError(reason)
    if (image.dtype != torch.uint8 or image.dim() != 3 or image.shape[0] != 3
            or image.shape[1] != image.shape[2]):
        raise ValueError(f"image must be uint8 (3, S, S), got {image.dtype} {tuple(image.shape)}")
    fusion = model.config.fusion
    h, w = model.vision.grid(image.shape[-1])
    n_image = h * w
    device = next(model.parameters()).device
    ids, mask = (t.to(device) for t in model.tokenize([question]))  # (1, L)
    L = ids.shape[1]
    was_training = model.training
    model.eval()
    try:
        out = model.fuse(image[None].to(device), ids, mask, need_weights=True)
        probs = model.head(out.pooled).float().softmax(dim=-1)[0]  # (A,)
    finally:
        model.train(was_training)
    if out.attention is None:
        raise ValueError(f"fusion {fusion} has no attention to show")
    weights = out.attention[0].float().mean(dim=0).cpu()  # (Nq, Nk), heads averaged
    ids, kept = ids[0].cpu(), mask[0].cpu()

    def expect(shape: tuple[int, int], layout: str) -> None:
        if tuple(weights.shape) != shape:
            raise ValueError(f"fusion {fusion}: expected {layout} attention of shape {shape} for a {h}x{w} "
                             f"grid and {L} tokens, got {tuple(weights.shape)}")

    if fusion == "attention_pooling":
        expect((weights.shape[0], n_image + L), "latents -> (Ni + Nt)")
        grid = weights[:MAX_LATENTS, :n_image]  # the image keys only; the rest of each row is on text
        labels = [f"latent {i} ({float(share):.0%} on image)" for i, share in enumerate(grid.sum(dim=-1))]
    else:
        if fusion == "self_attention":
            expect((n_image + L, n_image + L), "(Ni + Nt) -> (Ni + Nt)")
            weights = weights[n_image:, :n_image]  # (L, Ni): the text -> image block
        else:
            expect((L, n_image), "text -> image")
        grid = weights[kept]  # (P, Ni), padding rows dropped
        labels = _token_labels(model, ids[kept].tolist())
    p, index = probs.cpu().max(dim=0)
    return AttentionMaps(labels, grid.reshape(-1, h, w), question, model.answers.names[int(index)], float(p))


def attention_figure(image: Tensor, maps: AttentionMaps, *, max_columns: int = 6) -> Figure:
    """One panel per row of ``maps``: the image with that row's attention blended over it."""
    P = len(maps.labels)
    S = image.shape[-1]
    ncols = min(P, max_columns)
    nrows = math.ceil(P / ncols)
    fig = _new_figure((2.2 * ncols, 2.3 * nrows + 0.8))
    axes = fig.subplots(nrows, ncols, squeeze=False)
    heat = F.interpolate(maps.maps[:, None], size=(S, S), mode="bilinear", align_corners=False)
    heat = heat[:, 0]  # (P, S, S)
    rgb = image.permute(1, 2, 0).numpy()  # (S, S, 3)
    for ax, label, m, raw in zip(axes.flat, maps.labels, heat, maps.maps, strict=False):
        # Each panel on its own scale: a token's brightest position is its focus, whatever its total.
        m = (m / m.max().clamp_min(1e-12)).clamp(0, 1)
        ax.imshow(rgb)
        ax.imshow(m.numpy(), cmap="jet", alpha=0.45, vmin=0.0, vmax=1.0)
        ax.set_title(f"{label}\nmax {float(raw.max()):.2f}", fontsize=9)
        ax.axis("off")
    for ax in axes.flat[P:]:
        ax.remove()
    fig.suptitle(f"Q: {maps.question}\nA: {maps.answer} ({maps.probability:.0%})", fontsize=10)
    fig.tight_layout()
    return fig


def attention_map(model: VQAModel, image_uint8: Tensor, question: str, out_png: str | os.PathLike) -> str:
    """Draw :func:`attention_maps` of ``question`` over ``image_uint8`` (3, S, S) into ``out_png``;
    returns the predicted answer."""
    maps = attention_maps(model, image_uint8, question)
    _save(attention_figure(image_uint8, maps), out_png)
    return maps.answer


# --------------------------------------------------------------------------------------------------
# report


def _metrics_table(rows: list[dict[str, Any]]) -> list[str]:
    keys = dict.fromkeys(k for r in rows for k in r)  # first-seen order
    present = [k for k in keys if any(_is_number(r.get(k)) for r in rows)]
    columns = ["epoch", *[k for k in present if k.endswith(("_loss", "_accuracy"))],
               *[k for k in ("seconds", "questions_per_second") if k in present]]

    def cell(key: str, v: object) -> str:
        if not _is_number(v):
            return ""
        if key == "epoch" or key == "questions_per_second":
            return f"{v:.0f}"
        return f"{v:.1f}" if key == "seconds" else f"{v:.4f}"

    lines = ["| " + " | ".join(c.replace("_", " ") for c in columns) + " |",
             "|" + "---:|" * len(columns)]
    lines += ["| " + " | ".join(cell(c, r.get(c)) for c in columns) + " |" for r in rows]
    return lines


def _example_indices(n: int, k: int) -> list[int]:
    """``k`` question indices spread over ``n`` (questions of one image are adjacent)."""
    if n == 0 or k <= 0:
        return []
    return sorted({(i * n) // min(k, n) for i in range(min(k, n))})


def write_report(run_dir: str | os.PathLike, *, split: VQASplit | None = None, examples: int = 4) -> Path:
    """Write ``run_dir/report.md`` and its figures (in ``run_dir/figures/``); returns the report's path.

    ``split`` defaults to the test split of the run's data (``run.json`` key ``data``).
    """
    run_dir = Path(run_dir)
    model = VQAModel.from_pretrained(run_dir)
    if split is None:
        data = read_json(run_dir / "run.json").get("data")
        if not data:
            raise ValueError(f"{run_dir / 'run.json'} has no 'data'; pass split=")
        split = load_split(data, "test", image_size=model.config.image_size)
    figures = run_dir / _FIGURES
    c = model.config
    params = sum(p.numel() for p in model.parameters())
    md = [f"# Report: {run_dir.name}", "",
          f"Fusion `{c.fusion}`, vision `{c.vision}`, image size {c.image_size}, {params:,} parameters; "
          f"evaluated on `{split.name}` ({len(split)} questions).", ""]

    metrics_path = run_dir / "metrics.jsonl"
    md += ["## Training", ""]
    if metrics_path.is_file() and metrics_path.stat().st_size:
        md += _metrics_table(read_metrics(metrics_path))
        plot_training_curves(metrics_path, figures / "training_curves.png")
        md += ["", f"![training curves]({_FIGURES}/training_curves.png)", ""]
    else:
        md += ["No `metrics.jsonl` in the run directory.", ""]

    result = evaluate(model, split)
    by = "answer type" if split.answer_types else "answer"
    md += ["## Test accuracy", "", f"Overall: **{result.accuracy:.2%}** on {len(split)} questions"
           + (f" ({int((result.targets < 0).sum())} with answers outside the model's vocabulary)."
              if bool((result.targets < 0).any()) else "."), "",
           f"| {by} | accuracy |", "|---|---:|"]
    md += [f"| {k} | {v:.2%} |" for k, v in result.groups().items()]
    plot_confusion(result, figures / "confusion.png")
    md += ["", f"![confusion matrix]({_FIGURES}/confusion.png)", "", "## Attention maps", ""]

    reason = attention_unavailable(model)
    if reason:
        md += [f"No attention maps: {reason}.", ""]
    for k, i in enumerate([] if reason else _example_indices(len(split), examples)):
        image = split.images[int(split.image_index[i])]
        maps = attention_maps(model, image, split.questions[i])
        _save(attention_figure(image, maps), figures / f"attention_{k}.png")
        md += [f"**{split.questions[i]}** expected `{split.answers[i]}`, predicted `{maps.answer}` "
               f"({maps.probability:.0%})", "", f"![attention map {k}]({_FIGURES}/attention_{k}.png)", ""]

    out = run_dir / "report.md"
    atomic_write_text(out, "\n".join(md))
    return out
