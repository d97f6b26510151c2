"""Robustness: the accuracy of trained models when their images or their questions are corrupted.

After MultiBench's robustness evaluation: each perturbation corrupts one modality at a severity from 1
(mild) to 5 (severe), 0 being the clean input, and a model's robustness to it is read from its
accuracy-vs-severity curve.

Every perturbation is a pure function ``f(x, severity, generator)`` returning a new object of the same
kind, the same for the same generator state::

    image perturbations:  images (M, 3, S, S) uint8   ->  (M, 3, S, S) uint8
    text perturbations:   questions list[str] (N,)    ->  list[str] (N,), a non-empty question stays non-empty

Each one draws the same random numbers whatever the severity: the noise of severity 3 is the noise of
severity 1 scaled up, the grey square of severity 3 contains the one of severity 1, a word dropped at
severity 2 is dropped at severity 3 as well. A curve then shows the effect of severity, not the luck of
a fresh draw at each point.

Scores of a model on a perturbation, from ``acc[s]`` at severities s = 0..5 (``acc[0]`` = clean accuracy):

- ``auc``: the trapezoid area under ``acc`` over severities 0..5 (unit spacing, so 5.0 = always right);
- ``relative_robustness``: ``auc / (5 * acc[0])``, 1.0 when corruption costs nothing, undefined (None)
  for a model with no clean accuracy.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import itertools
import json
import logging
import math
import os
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import Tensor
from tqdm.auto import tqdm

from mmfuse.data import EASY_VQA, VQASplit, load_split
from mmfuse.evaluate import evaluate
from mmfuse.io import atomic_write_text
from mmfuse.models.vqa import VQAModel

__all__ = [
    "MAX_SEVERITY",
    "PERTURBATIONS",
    "Perturbation",
    "area_under_curve",
    "blur",
    "contrast",
    "evaluate_perturbed",
    "gaussian_noise",
    "occlusion",
    "perturb_split",
    "relative_robustness",
    "rotation",
    "run_robustness",
    "typos",
    "word_drop",
    "word_swap",
]

log = logging.getLogger(__name__)

MAX_SEVERITY = 5
SEVERITIES = tuple(range(MAX_SEVERITY + 1))

# Strength per severity 0..5.
_NOISE_STD = (0.0, 10.0, 20.0, 35.0, 55.0, 80.0)  # on the 0..255 pixel scale
_BLUR_SIGMA = (0.0, 0.75, 1.25, 2.0, 3.0, 4.0)  # pixels of a 64-pixel image, scaled with the image side
_CONTRAST = (1.0, 0.6, 0.4, 0.25, 0.15, 0.08)  # factor on each image's distance to its mean
_ROTATION_DEGREES = (0.0, 8.0, 16.0, 25.0, 35.0, 45.0)
_OCCLUDED_AREA = (0.0, 0.05, 0.1, 0.2, 0.3, 0.45)  # fraction of the image under the grey square
_WORD_RATE = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5)  # chance per word (typos, word_drop) or word pair (word_swap)
_GREY, _WHITE = 128.0, 255.0
_LETTERS = "abcdefghijklmnopqrstuvwxyz"
_TYPO_WORD = re.compile(r"[^\W\d_]{2,}")  # runs of two or more letters


def _check_severity(severity: int) -> None:
    if isinstance(severity, bool) or not isinstance(severity, int) or not 0 <= severity <= MAX_SEVERITY:
        raise ValueError(f"severity must be an int in 0..{MAX_SEVERITY}, got {severity!r}")


def _check_images(images: Tensor, severity: int) -> None:
    _check_severity(severity)
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be uint8 (M, 3, S, S), got {images.dtype} {tuple(images.shape)}")


def _check_questions(questions: Sequence[str], severity: int) -> None:
    _check_severity(severity)
    if isinstance(questions, str) or not all(isinstance(q, str) for q in questions):
        raise ValueError("questions must be a sequence of strings")


def _to_uint8(x: Tensor) -> Tensor:
    return x.round_().clamp_(0, 255).to(torch.uint8)


# --------------------------------------------------------------------------------------------------
# image perturbations: (M, 3, S, S) uint8 -> (M, 3, S, S) uint8


def gaussian_noise(images: Tensor, severity: int, generator: torch.Generator) -> Tensor:
    """Add Gaussian noise to every pixel and channel (std 10 to 80 on the 0..255 scale)."""
    _check_images(images, severity)
    if severity == 0:
        return images.clone()
    noise = torch.randn(images.shape, generator=generator)  # (M, 3, S, S)
    return _to_uint8(images.float() + _NOISE_STD[severity] * noise)


def blur(images: Tensor, severity: int, generator: torch.Generator) -> Tensor:
    """Gaussian blur, as two 1-D convolutions; sigma grows with severity and with the image side."""
    _check_images(images, severity)
    if severity == 0:
        return images.clone()
    side = images.shape[-1]
    sigma = _BLUR_SIGMA[severity] * side / 64
    radius = max(1, math.ceil(3 * sigma))
    taps = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (taps / sigma) ** 2)
    kernel = kernel / kernel.sum()  # (K,)
    K = kernel.numel()
    # Border pixels repeat outwards, so the edges do not darken as zero padding would make them.
    x = F.pad(images.float(), (radius,) * 4, mode="replicate")  # (M, 3, S + 2r, S + 2r)
    x = F.conv2d(x, kernel.view(1, 1, 1, K).expand(3, 1, 1, K), groups=3)  # (M, 3, S + 2r, S)
    x = F.conv2d(x, kernel.view(1, 1, K, 1).expand(3, 1, K, 1), groups=3)  # (M, 3, S, S)
    return _to_uint8(x)


def contrast(images: Tensor, severity: int, generator: torch.Generator) -> Tensor:
    """Pull each image towards its own mean grey level (factor 0.6 down to 0.08)."""
    _check_images(images, severity)
    if severity == 0:
        return images.clone()
    x = images.float()
    mean = x.mean(dim=(1, 2, 3), keepdim=True)  # (M, 1, 1, 1)
    return _to_uint8((x - mean) * _CONTRAST[severity] + mean)


def rotation(images: Tensor, severity: int, generator: torch.Generator) -> Tensor:
    """Rotate each image about its centre by 8 to 45 degrees, direction drawn per image; corners white."""
    _check_images(images, severity)
    if severity == 0:
        return images.clone()
    M = images.shape[0]
    sign = torch.randint(0, 2, (M,), generator=generator).float() * 2 - 1  # (M,)
    angle = sign * math.radians(_ROTATION_DEGREES[severity])
    cos, sin, zero = angle.cos(), angle.sin(), torch.zeros(M)
    theta = torch.stack([torch.stack([cos, -sin, zero], -1),
                         torch.stack([sin, cos, zero], -1)], 1)  # (M, 2, 3)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)  # (M, S, S, 2)
    # grid_sample fills outside the image with 0; sampling (x - 255) makes that fill white.
    out = F.grid_sample(images.float() - _WHITE, grid, mode="bilinear", padding_mode="zeros",
                        align_corners=False)  # (M, 3, S, S)
    return _to_uint8(out + _WHITE)


def occlusion(images: Tensor, severity: int, generator: torch.Generator) -> Tensor:
    """Paint a grey square over 5% to 45% of each image, at a position drawn per image."""
    _check_images(images, severity)
    if severity == 0:
        return images.clone()
    M, _, H, W = images.shape
    u = torch.rand((M, 2), generator=generator)  # (M, 2): where along y and x, in [0, 1)
    side_y = max(1, round(H * math.sqrt(_OCCLUDED_AREA[severity])))
    side_x = max(1, round(W * math.sqrt(_OCCLUDED_AREA[severity])))
    # start = floor(u * (free + 1)): with u fixed, a larger square contains the smaller one.
    y0 = (u[:, 0] * (H - side_y + 1)).long()  # (M,)
    x0 = (u[:, 1] * (W - side_x + 1)).long()  # (M,)
    rows, cols = torch.arange(H), torch.arange(W)
    in_y = (rows >= y0[:, None]) & (rows < y0[:, None] + side_y)  # (M, H)
    in_x = (cols >= x0[:, None]) & (cols < x0[:, None] + side_x)  # (M, W)
    covered = (in_y[:, :, None] & in_x[:, None, :])[:, None]  # (M, 1, H, W)
    return torch.where(covered, torch.tensor(int(_GREY), dtype=torch.uint8), images)


# --------------------------------------------------------------------------------------------------
# text perturbations: list[str] -> list[str]


def _typo(word: str, op: float, where: float, letter: float) -> str:
    """One edit of ``word`` (>= 2 characters): swap two neighbours, replace one, or drop one."""
    i = int(where * (len(word) - 1))
    if op < 1 / 3 and word[i] != word[i + 1]:  # a swap of equal letters would change nothing
        return word[:i] + word[i + 1] + word[i] + word[i + 2:]
    i = int(where * len(word))
    if op < 2 / 3:
        others = [c for c in _LETTERS if c != word[i].lower()]
        c = others[int(letter * len(others))]
        return word[:i] + (c.upper() if word[i].isupper() else c) + word[i + 1:]
    return word[:i] + word[i + 1:]


def typos(questions: Sequence[str], severity: int, generator: torch.Generator) -> list[str]:
    """Misspell words (runs of >= 2 letters), each with chance 0.1 to 0.5: swap, replace or drop a letter."""
    _check_questions(questions, severity)
    if severity == 0:
        return list(questions)
    rate = _WORD_RATE[severity]
    out = []
    for q in questions:
        words = list(_TYPO_WORD.finditer(q))
        # per word: hit, operation, position, letter
        draws = torch.rand((len(words), 4), generator=generator).tolist()  # (words, 4)
        pieces, end = [], 0
        for m, (hit, op, where, letter) in zip(words, draws, strict=True):
            pieces += [q[end:m.start()], _typo(m.group(), op, where, letter) if hit < rate else m.group()]
            end = m.end()
        out.append("".join(pieces) + q[end:])
    return out


def word_drop(questions: Sequence[str], severity: int, generator: torch.Generator) -> list[str]:
    """Drop whitespace-separated words, each with chance 0.1 to 0.5; at least one word always stays."""
    _check_questions(questions, severity)
    if severity == 0:
        return list(questions)
    rate = _WORD_RATE[severity]
    out = []
    for q in questions:
        words = q.split()
        draws = torch.rand(len(words), generator=generator).tolist()
        kept = [w for w, d in zip(words, draws, strict=True) if d >= rate]
        if words and not kept:  # the word least likely to go stays: it is kept at every lower severity too
            kept = [words[max(range(len(words)), key=draws.__getitem__)]]
        out.append(q if len(kept) == len(words) else " ".join(kept))
    return out


def word_swap(questions: Sequence[str], severity: int, generator: torch.Generator) -> list[str]:
    """Swap neighbouring words: each pair with chance 0.1 to 0.5, left to right, no word moved twice."""
    _check_questions(questions, severity)
    if severity == 0:
        return list(questions)
    rate = _WORD_RATE[severity]
    out = []
    for q in questions:
        words = q.split()
        draws = torch.rand(max(len(words) - 1, 0), generator=generator).tolist()
        i, swapped = 0, False
        while i < len(words) - 1:
            if draws[i] < rate:
                words[i], words[i + 1] = words[i + 1], words[i]
                swapped = True
                i += 2
            else:
                i += 1
        out.append(" ".join(words) if swapped else q)
    return out


@dataclass(frozen=True)
class Perturbation:
    """A named perturbation of one modality; call it as ``p(x, severity, generator)``."""

    name: str
    modality: Literal["image", "text"]
    fn: Callable[[Any, int, torch.Generator], Any]

    def __call__(self, x: Any, severity: int, generator: torch.Generator) -> Any:
        return self.fn(x, severity, generator)


PERTURBATIONS: dict[str, Perturbation] = {
    p.name: p for p in (
        Perturbation("gaussian_noise", "image", gaussian_noise),
        Perturbation("blur", "image", blur),
        Perturbation("contrast", "image", contrast),
        Perturbation("rotation", "image", rotation),
        Perturbation("occlusion", "image", occlusion),
        Perturbation("typos", "text", typos),
        Perturbation("word_drop", "text", word_drop),
        Perturbation("word_swap", "text", word_swap),
    )
}


def _perturbation(p: str | Perturbation) -> Perturbation:
    if isinstance(p, Perturbation):
        return p
    if p not in PERTURBATIONS:
        raise ValueError(f"unknown perturbation {p!r}; choose one of {list(PERTURBATIONS)}")
    return PERTURBATIONS[p]


def perturb_split(split: VQASplit, perturbation: str | Perturbation, severity: int, *, seed: int) -> VQASplit:
    """``split`` with its images or its questions perturbed (the other modality and answers unchanged)."""
    p = _perturbation(perturbation)
    generator = torch.Generator().manual_seed(seed)
    name = f"{split.name}+{p.name}@{severity}"
    if p.modality == "image":
        return dataclasses.replace(split, images=p(split.images, severity, generator), name=name)
    return dataclasses.replace(split, questions=p(split.questions, severity, generator), name=name)


def evaluate_perturbed(model: VQAModel, split: VQASplit, perturbation: str | Perturbation, severity: int, *,
                       seed: int = 0) -> float:
    """Accuracy of ``model`` on ``split`` perturbed at ``severity`` (0: the plain accuracy)."""
    return evaluate(model, perturb_split(split, perturbation, severity, seed=seed)).accuracy


def area_under_curve(accuracy: Sequence[float]) -> float:
    """Trapezoid area under accuracy over severities 0, 1, ... (unit spacing)."""
    return sum((a + b) / 2 for a, b in itertools.pairwise(accuracy))


def relative_robustness(accuracy: Sequence[float]) -> float | None:
    """:func:`area_under_curve` over ``(len - 1) * clean accuracy``; None when the clean accuracy is 0."""
    clean = accuracy[0]
    return area_under_curve(accuracy) / ((len(accuracy) - 1) * clean) if clean > 0 else None


# --------------------------------------------------------------------------------------------------
# the report over several checkpoints


def _model_names(checkpoints: Sequence[str | os.PathLike], fusions: Sequence[str]) -> list[str]:
    """The fusion name, or the run directory's name where fusions repeat (then the path, then a number)."""
    names = list(fusions)
    for fallback in (lambda i: Path(checkpoints[i]).resolve().name, lambda i: str(checkpoints[i])):
        counts = Counter(names)
        names = [fallback(i) if counts[n] > 1 else n for i, n in enumerate(names)]
    counts, seen = Counter(names), Counter()
    for i, n in enumerate(names):
        if counts[n] > 1:  # the same checkpoint given twice
            seen[n] += 1
            names[i] = f"{n} #{seen[n]}"
    return names


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.2%}"


def _mean(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return sum(known) / len(known) if known and len(known) == len(values) else None


def run_robustness(checkpoints: Sequence[str | os.PathLike], *, data: str = EASY_VQA, split: str = "test",
                   out_dir: str | os.PathLike = "runs/robustness", limit: int | None = None, seed: int = 0,
                   perturbations: Sequence[str] | None = None, progress: bool | None = None) -> Path:
    """Accuracy of each checkpoint under each perturbation at severities 0..5; returns the markdown path.

    Writes into ``out_dir``: ``robustness.md`` (one table per model: perturbation x severity, AUC and
    relative robustness), ``robustness.csv`` (one row per model and perturbation), ``robustness.json``
    (everything) and ``robustness.png`` (accuracy vs severity, one panel per perturbation, one line per
    model). ``limit`` keeps the first ``limit`` images of the split and their questions. The clean
    accuracy (severity 0) is measured once per model and shared by every perturbation.
    """
    if not checkpoints:
        raise ValueError("run_robustness needs at least one checkpoint")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive int or None, got {limit!r}")
    chosen = [_perturbation(p).name for p in (perturbations or PERTURBATIONS)]
    models = [VQAModel.from_pretrained(c) for c in checkpoints]
    names = _model_names(checkpoints, [m.config.fusion for m in models])

    splits: dict[int, VQASplit] = {}  # image size -> split, loaded once
    for model in models:
        size = model.config.image_size
        if size not in splits:
            loaded = load_split(data, split, image_size=size, progress=progress)
            splits[size] = loaded.first_images(limit) if limit is not None else loaded

    accuracy: list[dict[str, list[float]]] = [{p: [] for p in chosen} for _ in models]
    total = len(models) * (1 + len(chosen) * MAX_SEVERITY)
    with tqdm(total=total, desc="robustness", unit="eval", disable=None if progress is None else not progress,
              leave=False) as bar:
        for i, model in enumerate(models):
            clean = evaluate(model, splits[model.config.image_size]).accuracy
            for p in chosen:
                accuracy[i][p].append(clean)
            bar.update()
        # Each perturbed split is made once and evaluated by every model of its image size.
        for size, clean_split in splits.items():
            group = [i for i, m in enumerate(models) if m.config.image_size == size]
            for p in chosen:
                for severity in SEVERITIES[1:]:
                    bar.set_postfix_str(f"{p} {severity}")
                    perturbed = perturb_split(clean_split, p, severity, seed=seed)
                    for i in group:
                        accuracy[i][p].append(evaluate(models[i], perturbed).accuracy)
                        bar.update()

    any_split = next(iter(splits.values()))
    report: dict[str, Any] = {
        "data": str(data), "split": split, "limit": limit, "seed": seed,
        "num_images": int(any_split.images.shape[0]), "num_questions": len(any_split),
        "severities": list(SEVERITIES),
        "perturbations": {p: PERTURBATIONS[p].modality for p in chosen},
        "models": [],
    }
    for i, (name, model) in enumerate(zip(names, models, strict=True)):
        results = {p: {"modality": PERTURBATIONS[p].modality, "accuracy": acc, "auc": area_under_curve(acc),
                       "relative_robustness": relative_robustness(acc)} for p, acc in accuracy[i].items()}
        modalities = [m for m in ("image", "text") if m in report["perturbations"].values()]
        summary = {m: _mean([r["relative_robustness"] for r in results.values()
                             if m in ("all", r["modality"])]) for m in (*modalities, "all")}
        report["models"].append({"name": name, "checkpoint": str(checkpoints[i]),
                                 "fusion": model.config.fusion, "clean_accuracy": accuracy[i][chosen[0]][0],
                                 "results": results, "mean_relative_robustness": summary})
        log.info("robustness of %s: clean accuracy %.4f, mean relative robustness %s", name,
                 accuracy[i][chosen[0]][0], summary)
    return write_report(report, out_dir)


def write_report(report: dict[str, Any], out_dir: str | os.PathLike) -> Path:
    """``robustness.{md,csv,json,png}`` from the dictionary :func:`run_robustness` builds."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "robustness.json", json.dumps(report, indent=2) + "\n")

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["model", "checkpoint", "perturbation", "modality",
                     *(f"severity_{s}" for s in SEVERITIES), "auc", "relative_robustness"])
    for m in report["models"]:
        for p, r in m["results"].items():
            writer.writerow([m["name"], m["checkpoint"], p, r["modality"], *r["accuracy"], r["auc"],
                             "" if r["relative_robustness"] is None else r["relative_robustness"]])
    atomic_write_text(out_dir / "robustness.csv", buf.getvalue())

    limit = f", first {report['limit']} images" if report["limit"] is not None else ""
    md = [f"# Robustness on `{report['data']}` ({report['split']} split{limit}: {report['num_questions']} "
          f"questions, {report['num_images']} images; seed {report['seed']})", "",
          f"Accuracy at severity 0 (clean) to {MAX_SEVERITY}. AUC: trapezoid area under accuracy over "
          f"severities 0..{MAX_SEVERITY} ({MAX_SEVERITY}.0 = always right); relative robustness: "
          f"AUC / ({MAX_SEVERITY} x clean accuracy).", ""]
    for m in report["models"]:
        md += [f"## {m['name']} (`{m['checkpoint']}`, fusion {m['fusion']})", "",
               "| perturbation | modality | " + " | ".join(str(s) for s in SEVERITIES)
               + " | AUC | relative robustness |",
               "|---|---|" + "---:|" * (len(SEVERITIES) + 2)]
        md += [f"| {p} | {r['modality']} | " + " | ".join(_pct(a) for a in r["accuracy"])
               + f" | {r['auc']:.3f} | {_pct(r['relative_robustness'])} |" for p, r in m["results"].items()]
        md.append("")
    modalities = list(report["models"][0]["mean_relative_robustness"])
    md += ["## Summary", "",
           "| model | clean accuracy | "
           + " | ".join(f"mean relative robustness ({k})" for k in modalities) + " |",
           "|---|" + "---:|" * (len(modalities) + 1)]
    md += [f"| {m['name']} | {_pct(m['clean_accuracy'])} | "
           + " | ".join(_pct(m["mean_relative_robustness"][k]) for k in modalities) + " |"
           for m in report["models"]]
    path = out_dir / "robustness.md"
    atomic_write_text(path, "\n".join(md) + "\n")
    _plot(report, out_dir / "robustness.png")
    return path


def _plot(report: dict[str, Any], path: Path) -> None:
    perturbations = list(report["perturbations"])
    cols = min(4, len(perturbations))
    rows = math.ceil(len(perturbations) / cols)
    fig = Figure(figsize=(3.2 * cols, 2.8 * rows + 0.6))
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False).flatten()
    for ax, p in zip(axes, perturbations, strict=False):
        for m in report["models"]:
            ax.plot(SEVERITIES, m["results"][p]["accuracy"], marker="o", label=m["name"])
        ax.set_title(f"{p} ({report['perturbations'][p]})", fontsize=9)
        ax.set_xticks(SEVERITIES)
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    for ax in axes[len(perturbations):]:
        ax.set_visible(False)
    axes[0].set_ylabel("accuracy")
    axes[0].set_xlabel("severity")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(4, len(labels)), fontsize=8)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=100)
