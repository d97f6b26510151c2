"""Figures, report and robustness for image classifiers with context (the ``classify`` task).

**Per-level attention maps.** At each VGG block in ``levels`` the feature-map positions (queries) attend
to the context tokens (keys). A row of the weights sums to one over the context, so what a map can show
is *which positions* look at a given context token. For each level the panel shows the heads-averaged
weight that every position gives to the level's most position-selective context token (the one whose
weight varies most across positions, e.g. the colour word of "the red object"), upsampled over the
image; the panel's title names that token. The image (and the context image, if any) is shown beside.
With an image context whose tokens all look alike (a plain colour swatch), the maps are flat: the
attention then broadcasts the context to every position and the convolutions after it do the matching.

Shapes::

    S  image side    h_l, w_l  grid after block l    Nc  context tokens

    image: (3, S, S) uint8    LevelAttention.maps[l]: (h_l, w_l)
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from torch import Tensor

from mmfuse.data.classify import ClassifySplit
from mmfuse.data.storage import ImageStorage
from mmfuse.device import resolve_device
from mmfuse.io import atomic_write_text, read_json
from mmfuse.models.classifier import ImageClassifier
from mmfuse.perturbations import MAX_SEVERITY, PERTURBATIONS, SEVERITIES, get_perturbation
from mmfuse.plotting import new_figure, save_figure
from mmfuse.report import plot_training_curves
from mmfuse.robustness import area_under_curve, relative_robustness
from mmfuse.robustness import write_report as write_robustness_report
from mmfuse.runs import read_metrics
from mmfuse.tasks.classify import ClassifyTask

__all__ = ["LevelAttention", "attention_figure", "attention_map", "level_attention", "run_robustness",
           "write_report"]

_FIGURES = "figures"


@dataclass
class LevelAttention:
    """One example's prediction and its per-level attention maps (see the module docstring)."""

    prediction: str
    probability: float
    context: str | None = None
    maps: dict[int, Tensor] = field(default_factory=dict)  # level -> (h, w)
    tokens: dict[int, str] = field(default_factory=dict)  # level -> the context token mapped


def _token_names(model: ImageClassifier, ids: Tensor | None, num_tokens: int, ctx_grid: tuple[int, int]) -> list[str]:
    if ids is not None and model.tokenizer is not None:
        return [model.tokenizer.decode([int(i)]) or "<cls>" for i in ids]
    w = ctx_grid[1]
    return [f"patch ({i // w}, {i % w})" for i in range(num_tokens)]


@torch.no_grad()
def level_attention(model: ImageClassifier, image: Tensor, *, context: str | None = None,
                    context_image: Tensor | None = None) -> LevelAttention:
    """The prediction for one uint8 ``image`` (3, S, S) and its context, with per-level attention maps."""
    model.eval()
    device = next(model.parameters()).device
    images = image[None].to(device)
    ids = mask = None
    if model.config.context == "text":
        if context is None:
            raise ValueError("this model reads a text context: pass context=")
        ids, mask = (t.to(device) for t in model.tokenize([context]))
    ctx_images = None
    if model.config.context == "image":
        if context_image is None:
            raise ValueError("this model reads an image context: pass context_image=")
        ctx_images = context_image[None].to(device)
    logits, weights = model(images, ids, mask, ctx_images, need_weights=True)
    prob, pred = logits.float().softmax(-1)[0].max(-1)
    out = LevelAttention(model.labels.names[int(pred)], float(prob), context)
    S = image.shape[-1]
    for level, w in sorted(weights.items()):
        w = w[0].float().mean(0)  # heads averaged: (h*w, Nc)
        if mask is not None:
            w = w[:, mask[0]]  # padding never gets weight; drop it
        token = int(w.var(dim=0, unbiased=False).argmax()) if w.shape[0] > 1 else int(w[0].argmax())
        h = model.vgg.backbone.grid(S, level)[0]  # type: ignore[union-attr]
        out.maps[level] = w[:, token].reshape(h, -1).cpu()
        ctx_grid = (model.context_encoder.grid(S) if model.context_encoder is not None else (1, w.shape[1]))
        out.tokens[level] = _token_names(model, None if ids is None else ids[0][mask[0]], w.shape[1],
                                         ctx_grid)[token]
    return out


def attention_figure(image: Tensor, attention: LevelAttention, *, context_image: Tensor | None = None,
                     label: str | None = None) -> Figure:
    """The image (and context image), then one panel per level with its map blended over the image."""
    levels = sorted(attention.maps)
    first = [("image", image)] + ([("context image", context_image)] if context_image is not None else [])
    P = len(first) + len(levels)
    fig = new_figure((2.3 * P, 2.9))
    axes = fig.subplots(1, P, squeeze=False)[0]
    for ax, (title, img) in zip(axes, first, strict=False):
        ax.imshow(img.permute(1, 2, 0).numpy())
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    S = image.shape[-1]
    rgb = image.permute(1, 2, 0).numpy()
    for ax, level in zip(axes[len(first):], levels, strict=True):
        raw = attention.maps[level]
        heat = F.interpolate(raw[None, None], size=(S, S), mode="nearest")[0, 0]
        # Each panel on its own scale: the brightest position is the focus, whatever the level's total.
        lo, hi = float(raw.min()), float(raw.max())
        heat = (heat - lo) / max(hi - lo, 1e-12)
        ax.imshow(rgb)
        ax.imshow(heat.numpy(), cmap="jet", alpha=0.45, vmin=0.0, vmax=1.0)
        h, w = raw.shape
        ax.set_title(f"block {level} ({h}x{w}) -> {attention.tokens[level]!r}\n"
                     f"weight {lo:.2f}..{hi:.2f}", fontsize=8)
        ax.axis("off")
    title = f"context: {attention.context!r}  " if attention.context is not None else ""
    expected = f"  (label {label})" if label is not None else ""
    fig.suptitle(f"{title}predicted {attention.prediction} ({attention.probability:.0%}){expected}", fontsize=10)
    fig.tight_layout()
    return fig


def attention_map(model: ImageClassifier, image: Tensor, out_png: str | os.PathLike, *, context: str | None = None,
                  context_image: Tensor | None = None) -> LevelAttention:
    """Write :func:`attention_figure` of one example to ``out_png``; returns its :class:`LevelAttention`."""
    attention = level_attention(model, image, context=context, context_image=context_image)
    save_figure(attention_figure(image, attention, context_image=context_image), out_png)
    return attention


def _example(split: ClassifySplit, i: int) -> dict[str, Any]:
    ex: dict[str, Any] = {"image": split.images[int(split.image_index[i])]}
    if split.contexts is not None:
        ex["context"] = split.contexts[i]
    if split.context_images is not None and split.context_index is not None:
        ex["context_image"] = split.context_images[int(split.context_index[i])]
    return ex


def write_report(run_dir: str | os.PathLike, *, split: ClassifySplit | None = None, examples: int = 4) -> Path:
    """``run_dir/report.md``: training curves, test accuracy per label, per-level attention maps."""
    run_dir = Path(run_dir)
    task = ClassifyTask()
    model = task.load_model(run_dir)
    if split is None:
        settings = read_json(run_dir / "run.json")
        if not settings.get("data"):
            raise ValueError(f"{run_dir / 'run.json'} has no 'data'; pass split=")
        split = task.load_split(settings["data"], "test", **task.load_options(model),
                                storage=ImageStorage.from_settings(settings))
    c = model.config
    params = sum(p.numel() for p in model.parameters())
    figures = run_dir / _FIGURES
    levels = "" if c.context == "none" or not c.backbone.startswith("vgg") else (
        f", cross-attention at block(s) {', '.join(map(str, c.levels))} with {c.num_heads} head(s)")
    md = [f"# Report: {run_dir.name}", "",
          f"Backbone `{c.backbone}` (width {c.width}), context `{c.context}`{levels}, image size {c.image_size}, "
          f"{params:,} parameters; evaluated on `{split.name}` ({len(split)} examples).", "", "## Training", ""]
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file() and metrics.stat().st_size:
        rows = read_metrics(metrics)
        md += ["| epoch | train loss | train accuracy | seconds |", "|---:|---:|---:|---:|"]
        md += [f"| {r['epoch']} | {r['train_loss']:.4f} | {r['train_accuracy']:.4f} | {r['seconds']:.1f} |"
               for r in rows]
        plot_training_curves(metrics, figures / "training_curves.png")
        md += ["", f"![training curves]({_FIGURES}/training_curves.png)", ""]
    result = task.evaluate(model, split)
    md += ["## Test accuracy", "", f"Overall: **{result.accuracy:.2%}** on {len(split)} examples.", "",
           "| label | accuracy |", "|---|---:|"]
    md += [f"| {k} | {v:.2%} |" for k, v in result.per_label().items()]
    md += ["", "## Attention maps", ""]
    if c.context == "none" or model.vgg is None:
        md += ["No attention maps: this model does not attend to a context.", ""]
    else:
        step = max(1, len(split) // max(1, examples))
        for k, i in enumerate(range(0, min(len(split), step * examples), step)):
            ex = _example(split, i)
            att = level_attention(model, ex["image"], context=ex.get("context"),
                                  context_image=ex.get("context_image"))
            figure = attention_figure(ex["image"], att, context_image=ex.get("context_image"), label=split.labels[i])
            save_figure(figure, figures / f"attention_{k}.png")
            md += [f"Example {i}: expected `{split.labels[i]}`, predicted `{att.prediction}` "
                   f"({att.probability:.0%})", "", f"![attention {k}]({_FIGURES}/attention_{k}.png)", ""]
    out = run_dir / "report.md"
    atomic_write_text(out, "\n".join(md))
    return out


def _perturbed(split: ClassifySplit, name: str, severity: int, seed: int) -> ClassifySplit:
    p = get_perturbation(name)
    generator = torch.Generator().manual_seed(seed)
    label = f"{split.name}+{p.name}@{severity}"
    if p.modality == "image":
        return split.replace_images(p(split.images, severity, generator), label)
    perturbed = split.replace_images(split.images, label)
    perturbed.contexts = p(split.contexts, severity, generator)
    return perturbed


def run_robustness(checkpoints: Sequence[str | os.PathLike], *, data: str, split: str = "test",
                   out_dir: str | os.PathLike = "runs/robustness", seed: int = 0,
                   perturbations: Sequence[str] | None = None, device: str = "cpu",
                   storage: ImageStorage | str = "auto") -> Path:
    """Accuracy of classifiers under image perturbations (and text ones on text contexts) at severities
    0..5, written as :func:`mmfuse.robustness.write_report` does; returns the markdown path. ``storage``:
    where the split's decoded images live."""
    task = ClassifyTask()
    models = [task.load_model(c, device=resolve_device(device)) for c in checkpoints]
    splits: dict[int, ClassifySplit] = {}  # image size -> split, loaded once
    for m in models:
        if m.config.image_size not in splits:
            splits[m.config.image_size] = task.load_split(data, split, **task.load_options(m), storage=storage)
    has_text = all(s.contexts is not None for s in splits.values())
    chosen = [get_perturbation(p).name for p in (perturbations or PERTURBATIONS)
              if has_text or get_perturbation(p).modality == "image"]
    names = [Path(c).resolve().name for c in checkpoints]
    report: dict[str, Any] = {"data": str(data), "split": split, "limit": None, "seed": seed,
                              "num_images": int(next(iter(splits.values())).images.shape[0]),
                              "num_questions": len(next(iter(splits.values()))), "severities": list(SEVERITIES),
                              "perturbations": {p: PERTURBATIONS[p].modality for p in chosen}, "models": []}
    for name, ckpt, model in zip(names, checkpoints, models, strict=True):
        clean_split = splits[model.config.image_size]
        clean = task.evaluate(model, clean_split).accuracy
        results = {}
        for p in chosen:
            acc = [clean] + [task.evaluate(model, _perturbed(clean_split, p, s, seed)).accuracy
                             for s in range(1, MAX_SEVERITY + 1)]
            results[p] = {"modality": PERTURBATIONS[p].modality, "accuracy": acc, "auc": area_under_curve(acc),
                          "relative_robustness": relative_robustness(acc)}
        modalities = sorted({r["modality"] for r in results.values()})
        summary = {}
        for m in (*modalities, "all"):
            vals = [r["relative_robustness"] for r in results.values() if m in ("all", r["modality"])]
            summary[m] = None if any(v is None for v in vals) else sum(vals) / len(vals)
        c = model.config
        report["models"].append({"name": name, "checkpoint": str(ckpt),
                                 "fusion": f"{c.backbone} context={c.context} levels={list(c.levels)}",
                                 "clean_accuracy": clean, "results": results, "mean_relative_robustness": summary})
    return write_robustness_report(report, out_dir)

