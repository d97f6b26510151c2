"""Robustness: the accuracy of trained models when their images or their questions are corrupted.

After MultiBench's robustness evaluation: each perturbation corrupts one modality at a severity from 1
(mild) to 5 (severe), 0 being the clean input, and a model's robustness to it is read from its
accuracy-vs-severity curve.

The perturbations themselves are in :mod:`mmfuse.perturbations`.

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
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from mmfuse.data import EASY_VQA, ImageStorage, VQASplit, load_split
from mmfuse.device import resolve_device
from mmfuse.evaluate import evaluate
from mmfuse.io import atomic_write_text
from mmfuse.models.vqa import VQAModel
from mmfuse.perturbations import MAX_SEVERITY, PERTURBATIONS, SEVERITIES, Perturbation, get_perturbation
from mmfuse.plotting import new_figure, save_figure

__all__ = ["area_under_curve", "evaluate_perturbed", "perturb_split", "relative_robustness", "run_robustness"]

log = logging.getLogger(__name__)

def perturb_split(split: VQASplit, perturbation: str | Perturbation, severity: int, *, seed: int) -> VQASplit:
    """``split`` with its images or its questions perturbed (the other modality and answers unchanged)."""
    p = get_perturbation(perturbation)
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
                   perturbations: Sequence[str] | None = None, progress: bool | None = None,
                   device: str = "cpu", storage: ImageStorage | str = "auto") -> Path:
    """Accuracy of each checkpoint under each perturbation at severities 0..5; returns the markdown path.

    Writes into ``out_dir``: ``robustness.md`` (one table per model: perturbation x severity, AUC and
    relative robustness), ``robustness.csv`` (one row per model and perturbation), ``robustness.json``
    (everything) and ``robustness.png`` (accuracy vs severity, one panel per perturbation, one line per
    model). ``limit`` keeps the first ``limit`` images of the split and their questions; ``device`` is where
    the models run (``auto``: see :func:`mmfuse.device.resolve_device`); ``storage`` where the split's decoded
    images live (:class:`~mmfuse.data.ImageStorage`). The clean
    accuracy (severity 0) is measured once per model and shared by every perturbation.
    """
    if not checkpoints:
        raise ValueError("run_robustness needs at least one checkpoint")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive int or None, got {limit!r}")
    chosen = [get_perturbation(p).name for p in (perturbations or PERTURBATIONS)]
    models = [VQAModel.from_pretrained(c, device=resolve_device(device)) for c in checkpoints]
    names = _model_names(checkpoints, [m.config.fusion for m in models])

    def decoding(model: VQAModel) -> tuple[int, str]:
        return model.config.image_size, model.config.resize

    splits: dict[tuple[int, str], VQASplit] = {}  # (image size, resize mode) -> split, loaded once
    for model in models:
        key = decoding(model)
        if key not in splits:
            loaded = load_split(data, split, image_size=key[0], resize=key[1], progress=progress, storage=storage)
            splits[key] = loaded.first_images(limit) if limit is not None else loaded

    accuracy: list[dict[str, list[float]]] = [{p: [] for p in chosen} for _ in models]
    total = len(models) * (1 + len(chosen) * MAX_SEVERITY)
    with tqdm(total=total, desc="robustness", unit="eval", disable=None if progress is None else not progress,
              leave=False) as bar:
        for i, model in enumerate(models):
            clean = evaluate(model, splits[decoding(model)]).accuracy
            for p in chosen:
                accuracy[i][p].append(clean)
            bar.update()
        # Each perturbed split is made once and evaluated by every model that takes its images.
        for key, clean_split in splits.items():
            group = [i for i, m in enumerate(models) if decoding(m) == key]
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
    fig = new_figure((3.2 * cols, 2.8 * rows + 0.6))
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
    save_figure(fig, path)
