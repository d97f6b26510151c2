"""A markdown report for a training run: curves, confusion matrix, attention maps.

The figures themselves are drawn by :mod:`mmfuse.plotting`; this module gathers what they show from
a run directory and a model. Attention maps show, for one question, where each question token (or
each latent query of ``attention_pooling``) looks in the image: the fusion's cross-modal attention
weights, averaged over heads (or one panel per head), laid back on the vision encoder's feature grid.
Shapes::

    S  image side    h, w  vision grid (``model.vision.grid(S)``)    P  panels (tokens or latents)

    image: (3, S, S) uint8    AttentionMaps.maps: (P, h, w), weights of each panel's image positions
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mmfuse.data import ImageStorage, VQASplit, load_split
from mmfuse.data.vocab import CLS
from mmfuse.evaluate import EvalResult, evaluate
from mmfuse.fusion import HOPS_TO_IMAGE, LATENTS_TO_TOKENS, TOKENS_TO_TOKENS
from mmfuse.io import atomic_write_text, read_json
from mmfuse.models.vqa import VQAModel
from mmfuse.plotting import AttentionMaps, attention_figure, confusion_figure, curves_figure, new_figure, save_figure
from mmfuse.runs import read_metrics

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

MAX_LATENTS = 8  # attention_pooling may have dozens of latents; the first few show the pattern
_FIGURES = "figures"


# Earlier names of plotting.new_figure / save_figure, kept for code that imports them from here.
_new_figure = new_figure
_save = save_figure


# --------------------------------------------------------------------------------------------------
# training curves and confusion matrix


def _is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def plot_training_curves(metrics_path: str | os.PathLike, out_png: str | os.PathLike) -> Path:
    """Loss and accuracy per epoch (training, and every evaluated split present) from ``metrics.jsonl``."""
    return save_figure(curves_figure(read_metrics(metrics_path)), out_png)


def plot_confusion(result: EvalResult, out_png: str | os.PathLike) -> Path:
    """Row-normalised confusion matrix (row = expected answer, column = predicted) with answer names."""
    fig = confusion_figure(result.confusion(), result.answer_names,
                           title=f"{result.split.name}: accuracy {result.accuracy:.2%}")
    return save_figure(fig, out_png)


# --------------------------------------------------------------------------------------------------
# attention maps


def attention_unavailable(model: VQAModel) -> str | None:
    """Why ``model`` cannot give attention maps, or None when it can."""
    c = model.config
    if model.fusion.attention_layout is None:
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
def attention_maps(model: VQAModel, image: Tensor, question: str, *, per_head: bool = False) -> AttentionMaps:
    """The attention of ``question``'s tokens (latents for ``attention_pooling``, hops for ``multi_hop``)
    over ``image``.

    One panel per token, heads averaged; ``per_head=True`` gives one panel per token and head instead
    (labels ``"word h0"``, ...), in token-major order.

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
    layout = model.fusion.attention_layout
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
    heads = out.attention[0].float().cpu()  # (H, Nq, Nk)
    weights = heads.mean(dim=0)  # (Nq, Nk), heads averaged
    num_keys = weights.shape[-1]
    ids, kept = ids[0].cpu(), mask[0].cpu()

    def expect(shape: tuple[int, int], what: str) -> None:
        if tuple(weights.shape) != shape:
            raise ValueError(f"fusion {fusion}: expected {what} attention of shape {shape} for a {h}x{w} "
                             f"grid and {L} tokens, got {tuple(weights.shape)}")

    if layout == LATENTS_TO_TOKENS:
        expect((weights.shape[0], n_image + L), "latents -> (Ni + Nt)")
        rows = torch.arange(min(MAX_LATENTS, weights.shape[0]))
        heads = heads[:, rows, :n_image]  # (H, P, Ni): the image keys only; the rest of each row is on text
        labels = [f"latent {i} ({float(share):.0%} on image)" for i, share in enumerate(heads.mean(0).sum(-1))]
    elif layout == HOPS_TO_IMAGE:
        expect((weights.shape[0], n_image), "hops -> image")
        labels = [f"hop {k + 1}" for k in range(weights.shape[0])]
    else:
        if layout == TOKENS_TO_TOKENS:
            expect((n_image + L, n_image + L), "(Ni + Nt) -> (Ni + Nt)")
            heads = heads[:, n_image:, :n_image]  # (H, L, Ni): the text -> image block
        else:
            expect((L, n_image), "text -> image")
        heads = heads[:, kept]  # (H, P, Ni), padding rows dropped
        labels = _token_labels(model, ids[kept].tolist())
    if per_head:
        H = heads.shape[0]
        grid = heads.transpose(0, 1).reshape(-1, n_image)  # (P * H, Ni), token-major
        labels = [f"{label} h{i}" for label in labels for i in range(H)]
    else:
        grid = heads.mean(dim=0)  # (P, Ni)
    p, index = probs.cpu().max(dim=0)
    return AttentionMaps(labels, grid.reshape(-1, h, w), question, model.answers.names[int(index)], float(p),
                         num_keys=num_keys)


def attention_map(model: VQAModel, image_uint8: Tensor, question: str, out_png: str | os.PathLike, *,
                  per_head: bool = False) -> str:
    """Draw :func:`attention_maps` of ``question`` over ``image_uint8`` (3, S, S) into ``out_png``;
    returns the predicted answer."""
    maps = attention_maps(model, image_uint8, question, per_head=per_head)
    save_figure(attention_figure(image_uint8, maps), out_png)
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
        settings = read_json(run_dir / "run.json")
        if not settings.get("data"):
            raise ValueError(f"{run_dir / 'run.json'} has no 'data'; pass split=")
        split = load_split(settings["data"], "test", image_size=model.config.image_size, resize=model.config.resize,
                           storage=ImageStorage.from_settings(settings))
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
        save_figure(attention_figure(image, maps), figures / f"attention_{k}.png")
        md += [f"**{split.questions[i]}** expected `{split.answers[i]}`, predicted `{maps.answer}` "
               f"({maps.probability:.0%})", "", f"![attention map {k}]({_FIGURES}/attention_{k}.png)", ""]

    out = run_dir / "report.md"
    atomic_write_text(out, "\n".join(md))
    return out
