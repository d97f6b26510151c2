"""Ablation: train several fusions with the same data, seed and budget, and compare them.

``run_ablation`` trains each fusion into ``out_dir/<fusion>/`` and writes ``out_dir/results.md`` (a
markdown table), ``out_dir/results.csv`` and ``out_dir/results.png`` (accuracy bars, parameter counts
annotated). Measured per fusion:

- ``test_accuracy``: accuracy of the final model on the test split;
- ``params``: parameter count of the whole model (vision and text encoders included);
- ``seconds_per_epoch``: mean of the epochs' training time (``metrics.jsonl`` "seconds");
- ``train_questions_per_second``: training questions over training seconds, all epochs together;
- ``inference_questions_per_second``: test questions over the time of one full ``evaluate`` of the test
  split, the split already in memory.
"""

from __future__ import annotations

import csv
import logging
import os
import time
from pathlib import Path
from typing import Any

import torch

from mmfuse.data import EASY_VQA, ImageStorage, VQASplit, load_split
from mmfuse.device import resolve_device
from mmfuse.evaluate import evaluate
from mmfuse.fusion import available
from mmfuse.models.vqa import VQAModel
from mmfuse.plotting import new_figure, save_figure
from mmfuse.report import read_metrics
from mmfuse.train import TrainConfig, train

__all__ = ["CLASSIFY_COLUMNS", "CLASSIFY_VARIANTS", "COLUMNS", "DEFAULT_CLASSIFY_VARIANTS", "DEFAULT_FUSIONS",
           "run_ablation", "run_classify_ablation", "write_results"]

log = logging.getLogger(__name__)

DEFAULT_FUSIONS = ["text_only", "concat", "product", "self_attention", "cross_attention", "attention_pooling",
                   "fusion_transformer"]
COLUMNS = ["fusion", "test_accuracy", "params", "seconds_per_epoch", "train_questions_per_second",
           "inference_questions_per_second"]
_FIXED = ("data", "out", "epochs", "seed")  # set by run_ablation itself, identical for every fusion


def _measure(fusion: str, run_dir: Path, test: dict[tuple[int, str], VQASplit], data: str, progress: bool | None,
             device: str, storage: ImageStorage) -> dict[str, Any]:
    model = VQAModel.from_pretrained(run_dir, device=resolve_device(device))
    key = (model.config.image_size, model.config.resize)
    if key not in test:
        test[key] = load_split(data, "test", image_size=key[0], resize=key[1], progress=progress, storage=storage)
    split = test[key]
    t0 = time.perf_counter()
    result = evaluate(model, split)
    seconds = time.perf_counter() - t0
    rows = read_metrics(run_dir / "metrics.jsonl")
    train_seconds = sum(r["seconds"] for r in rows)
    # questions_per_second * seconds recovers each epoch's question count
    train_questions = sum(r["questions_per_second"] * r["seconds"] for r in rows)
    return {"fusion": fusion, "test_accuracy": result.accuracy,
            "params": sum(p.numel() for p in model.parameters()),
            "seconds_per_epoch": train_seconds / len(rows),
            "train_questions_per_second": train_questions / train_seconds,
            "inference_questions_per_second": len(split) / seconds, "run_dir": str(run_dir)}


def run_ablation(*, data: str = EASY_VQA, fusions: list[str], epochs: int, seed: int = 0,
                 out_dir: str | os.PathLike, base: dict[str, Any] | None = None,
                 progress: bool | None = None) -> list[dict[str, Any]]:
    """Train each of ``fusions`` and measure it (see the module docstring); rows in the order given.

    ``base`` holds further :class:`~mmfuse.train.TrainConfig` fields shared by every run, model options
    under ``"model"``; data, epochs, seed, output folder and fusion are set here and may not be in it.
    """
    base = dict(base or {})
    clash = [k for k in _FIXED if k in base] + (["model.fusion"] if "fusion" in base.get("model", {}) else [])
    if clash:
        raise ValueError(f"base may not set {clash}: run_ablation sets them for every fusion")
    unknown = [f for f in fusions if f not in available()]
    if not fusions or unknown:
        raise ValueError(f"fusions must be a non-empty list of {available()}, got {fusions} "
                         f"(unknown: {unknown})")
    if len(set(fusions)) != len(fusions):
        raise ValueError(f"fusions has duplicates: {fusions}")
    out_dir = Path(out_dir)
    model_options = dict(base.pop("model", {}))
    test: dict[tuple[int, str], VQASplit] = {}  # (image size, resize mode) -> test split, loaded once
    rows = []
    for fusion in fusions:
        run_dir = out_dir / fusion
        log.info("ablation: training %s into %s", fusion, run_dir)
        cfg = TrainConfig(**base, data=str(data), out=str(run_dir), epochs=epochs, seed=seed,
                          progress=progress, model={**model_options, "fusion": fusion})
        train(cfg)
        rows.append(_measure(fusion, run_dir, test, str(data), progress, cfg.device, cfg.storage))
    threads = torch.get_num_threads()
    header = (f"Ablation on `{data}`: {epochs} epoch{'s' if epochs != 1 else ''}, seed {seed}, "
              f"{threads} CPU thread{'s' if threads != 1 else ''}.")
    write_results(rows, out_dir, header=header)
    return rows


def _fmt(key: str, v: Any) -> str:
    if key in ("test_accuracy", "accuracy"):
        return f"{v:.2%}"
    if key == "params":
        return f"{v:,}"
    if key == "seconds_per_epoch":
        return f"{v:.2f}"
    return f"{v:.0f}" if isinstance(v, float) else str(v)


def _short(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}k" if n >= 1e3 else str(n)


def write_results(rows: list[dict[str, Any]], out_dir: str | os.PathLike, *, header: str,
                  columns: list[str] = COLUMNS, name: str = "fusion", metric: str = "test_accuracy") -> None:
    """``results.md`` (``header``, then a table), ``results.csv`` and ``results.png`` into ``out_dir``.

    ``columns`` are the table's, ``name`` the column naming each row, ``metric`` the one charted.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    md = [header, "", "| " + " | ".join(c.replace("_", " ") for c in columns) + " |",
          "|---|" + "---:|" * (len(columns) - 1)]
    md += ["| " + " | ".join(_fmt(c, r[c]) for c in columns) + " |" for r in rows]
    (out_dir / "results.md").write_text("\n".join(md) + "\n", encoding="utf-8")

    with open(out_dir / "results.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)

    fig = new_figure((max(5.0, 1.1 * len(rows) + 2.0), 4.0))
    ax = fig.subplots()
    accuracy = [r[metric] for r in rows]
    bars = ax.bar(range(len(rows)), accuracy, color="tab:blue")
    ax.set_xticks(range(len(rows)), [r[name] for r in rows], rotation=30, ha="right")
    ax.set_ylim(0, 1.1)
    ax.set_ylabel("test accuracy")
    ax.set_title(header.replace("`", ""), fontsize=9)
    for bar, r in zip(bars, rows, strict=True):
        ax.annotate(f"{r[metric]:.1%}\n{_short(r['params'])} params",
                    (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom",
                    fontsize=8)
    fig.tight_layout()
    save_figure(fig, out_dir / "results.png")


# --------------------------------------------------------------------------------------------------
# image classification with context (the classify task): variants of the classifier, not fusions

#: the classifier's model options of each variant (on top of the options shared by the ablation)
CLASSIFY_VARIANTS: dict[str, dict[str, Any]] = {
    "vgg16": {"backbone": "vgg16", "context": "none"},
    "vgg16-xattn": {"backbone": "vgg16", "num_heads": 1, "levels": (5,)},
    "vgg16-xattn-8h": {"backbone": "vgg16", "num_heads": 8, "levels": (5,)},
    "vgg16-multilevel": {"backbone": "vgg16", "num_heads": 1, "levels": (2, 3, 4, 5)},
    "vgg16-multilevel-gate": {"backbone": "vgg16", "num_heads": 1, "levels": (2, 3, 4, 5), "residual": "gate"},
    "vgg16-xattn-gate": {"backbone": "vgg16", "num_heads": 1, "levels": (5,), "residual": "gate"},
    "vgg16-xattn-mlp": {"backbone": "vgg16", "num_heads": 1, "levels": (5,), "mlp_ratio": 4.0},
    "vgg16-multilevel-mlp": {"backbone": "vgg16", "num_heads": 1, "levels": (2, 3, 4, 5), "mlp_ratio": 4.0},
    "vgg11": {"backbone": "vgg11", "context": "none"},
    "vgg11-xattn": {"backbone": "vgg11", "num_heads": 1, "levels": (5,)},
    "resnet18": {"backbone": "resnet18", "context": "none"},
    "resnet50": {"backbone": "resnet50", "context": "none"},
}
DEFAULT_CLASSIFY_VARIANTS = ["vgg16", "vgg16-xattn", "vgg16-xattn-8h", "vgg16-xattn-mlp", "vgg16-multilevel",
                             "vgg16-multilevel-gate", "resnet18"]
CLASSIFY_COLUMNS = ["variant", "accuracy", "params", "seconds_per_epoch", "train_images_per_second",
                    "inference_images_per_second"]


def run_classify_ablation(*, data: str, variants: list[str], epochs: int, seed: int = 0,
                          out_dir: str | os.PathLike, base: dict[str, Any] | None = None,
                          progress: bool | None = None) -> list[dict[str, Any]]:
    """Train each classifier variant of :data:`CLASSIFY_VARIANTS` on ``data`` and measure it.

    Columns (:data:`CLASSIFY_COLUMNS`): ``accuracy`` on the test split (a fraction), ``params`` of the
    whole model (context encoder included), mean ``seconds_per_epoch`` of training, training and
    inference images per second (inference: one ``evaluate`` of the test split, already in memory).
    ``base``: shared TrainConfig fields over the classify task's own recipe (its ``train_defaults``), model
    options under ``"model"`` (e.g. width, image_size).
    """
    from mmfuse import tasks

    base = dict(base or {})
    clash = [k for k in (*_FIXED, "task") if k in base]
    if clash:
        raise ValueError(f"base may not set {clash}: run_classify_ablation sets them for every variant")
    unknown = [v for v in variants if v not in CLASSIFY_VARIANTS]
    if not variants or unknown or len(set(variants)) != len(variants):
        raise ValueError(f"variants must be distinct names of {list(CLASSIFY_VARIANTS)}, got {variants}")
    out_dir = Path(out_dir)
    model_options = dict(base.pop("model", {}))
    task = tasks.create("classify")
    settings = {**task.train_defaults, **base}
    storage = ImageStorage.from_settings(settings)
    splits: dict[tuple[str, int], Any] = {}  # (split, image size) -> split, loaded once

    def split(name: str, size: int | None) -> Any:
        key = (name, size or 64)
        if key not in splits:
            splits[key] = task.load_split(str(data), name, image_size=size, progress=progress, storage=storage)
        return splits[key]

    rows = []
    for variant in variants:
        run_dir = out_dir / variant
        log.info("ablation: training %s into %s", variant, run_dir)
        options = {**model_options, **CLASSIFY_VARIANTS[variant]}
        cfg = TrainConfig(**{**settings, "task": "classify", "data": str(data), "out": str(run_dir),
                             "epochs": epochs, "seed": seed, "progress": progress, "model": options})
        size = options.get("image_size")
        train(cfg, train_split=split("train", size), eval_split=split("test", size))
        model = task.load_model(run_dir, device=resolve_device(cfg.device))
        test = split("test", model.config.image_size)
        t0 = time.perf_counter()
        result = task.evaluate(model, test)
        seconds = time.perf_counter() - t0
        metrics = read_metrics(run_dir / "metrics.jsonl")
        train_seconds = sum(r["seconds"] for r in metrics)
        train_images = sum(r["questions_per_second"] * r["seconds"] for r in metrics)
        rows.append({"variant": variant, "accuracy": result.accuracy,
                     "params": sum(p.numel() for p in model.parameters()),
                     "seconds_per_epoch": train_seconds / len(metrics),
                     "train_images_per_second": train_images / train_seconds,
                     "inference_images_per_second": len(test) / seconds, "run_dir": str(run_dir)})
    threads = torch.get_num_threads()
    header = (f"Classifier ablation on `{data}`: {epochs} epoch{'s' if epochs != 1 else ''}, seed {seed}, "
              f"{threads} CPU thread{'s' if threads != 1 else ''}.")
    write_results(rows, out_dir, header=header, columns=CLASSIFY_COLUMNS, name="variant", metric="accuracy")
    return rows
