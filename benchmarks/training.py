"""End to end on easy-VQA: training and inference questions/s per fusion (fp32 and bf16 autocast, and the
default fusion under ``torch.compile``), and the wall time of the default ``mmfuse train`` to 99% test accuracy.

Throughput is timed on real image-grouped batches (each image encoded once for all its questions), after
two warm-up steps (whose time, compilation included, is reported as ``warmup_s``); batches differ in their
number of questions and question length, so a compiled model meets several shapes, as in training.
The time-to-accuracy run is the default training configuration end to end, data
loading included, evaluating the test split after every epoch; its wall time includes those evaluations.
"""

from __future__ import annotations

import itertools
import json
import tempfile
import time
from typing import Any

import torch

from mmfuse.data import load_split
from mmfuse.evaluate import evaluate
from mmfuse.train import TrainConfig, Trainer

FUSIONS = ["text_only", "concat", "product", "self_attention", "cross_attention", "attention_pooling",
           "gated_cross_attention", "fusion_transformer"]
TARGET = 0.99
TARGET_SECONDS = 180.0


def _throughput(fusion: str, train, test, *, precision: str, steps: int, compile: bool = False) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as out:
        cfg = TrainConfig(out=out, epochs=1, progress=False, precision=precision, compile=compile,
                          model={"fusion": fusion})
        trainer = Trainer(cfg, train_split=train, eval_split=test)
        epochs = itertools.chain.from_iterable(trainer.batches.epoch(e) for e in itertools.count())
        batches = list(itertools.islice(epochs, steps + 2))
        start = time.perf_counter()
        for b in batches[:2]:
            trainer.train_step(b)
        warmup = time.perf_counter() - start
        start = time.perf_counter()
        questions = 0
        for b in batches[2:]:
            trainer.train_step(b)
            questions += len(b)
        train_qps = questions / (time.perf_counter() - start)
        start = time.perf_counter()
        result = evaluate(trainer.model, test, precision=precision)
        infer_qps = len(result.targets) / (time.perf_counter() - start)
        params = sum(p.numel() for p in trainer.model.parameters())
    return {"train_questions_per_s": train_qps, "inference_questions_per_s": infer_qps, "params": params,
            "warmup_s": warmup}


def _time_to_target(*, quick: bool) -> dict[str, Any]:
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        if quick:
            train = load_split("easy-vqa", "train").first_images(64)
            test = load_split("easy-vqa", "test").first_images(16)
            cfg = TrainConfig(out=out, epochs=1, progress=False, eval_every=1)
            Trainer(cfg, train_split=train, eval_split=test).fit()
        else:
            cfg = TrainConfig(out=out, progress=False, eval_every=1)  # the defaults of `mmfuse train`
            Trainer(cfg).fit()
        wall = time.perf_counter() - start
        with open(f"{out}/metrics.jsonl", encoding="utf-8") as f:
            rows = [json.loads(line) for line in f]
    elapsed = 0.0
    reached = None
    for r in rows:
        elapsed += r["seconds"]
        if reached is None and r.get("test_accuracy", 0.0) >= TARGET:
            reached = {"epoch": r["epoch"], "training_seconds": elapsed}
    return {"wall_seconds": wall, "epochs": len(rows), "final_test_accuracy": rows[-1]["test_accuracy"],
            "accuracy_by_epoch": [r.get("test_accuracy") for r in rows],
            "seconds_by_epoch": [r["seconds"] for r in rows], "reached_target": reached}


def run(*, quick: bool) -> dict[str, Any]:
    train = load_split("easy-vqa", "train")
    test = load_split("easy-vqa", "test")
    if quick:
        train, test = train.first_images(64), test.first_images(16)
    steps = 2 if quick else 20
    fusions = FUSIONS[:2] if quick else FUSIONS
    # Without native bf16 (AVX-512-BF16 / AMX) oneDNN emulates it, tens of times slower than fp32:
    # timing every fusion that way would take an hour and say only that. One fusion shows the cost.
    native_bf16 = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    rows = []
    for fusion in fusions:
        for bf16 in (False, True):
            if bf16 and not native_bf16 and fusion != fusions[-1]:
                continue
            rows.append({"fusion": fusion, "dtype": "bf16" if bf16 else "fp32", "compile": False,
                         **_throughput(fusion, train, test, precision="bf16" if bf16 else "fp32",
                                       steps=1 if bf16 and not native_bf16 else steps)})
    if not quick:  # compiling takes minutes on a CPU: the full run only
        rows.append({"fusion": "fusion_transformer", "dtype": "fp32", "compile": True,
                     **_throughput("fusion_transformer", train, test, precision="fp32", steps=steps, compile=True)})
    target = _time_to_target(quick=quick)
    checks = {"throughputs positive": all(r["train_questions_per_s"] > 0 for r in rows)}
    if not quick:
        checks[f"default training reaches {TARGET:.0%}"] = target["final_test_accuracy"] >= TARGET
        checks[f"default training within {TARGET_SECONDS:.0f} s"] = target["wall_seconds"] <= TARGET_SECONDS
    return {"threads": torch.get_num_threads(), "native_bf16": native_bf16, "rows": rows, "time_to_target": target,
            "checks": checks}


def to_markdown(result: dict[str, Any]) -> str:
    lines = []
    if not result.get("native_bf16", True):
        lines += ["This CPU has no native bf16 (oneDNN emulates it), so bf16 is timed for one fusion only.", ""]
    lines += ["| fusion | dtype | compiled | params | train questions/s | inference questions/s | warm-up s |",
              "|---|---|---|---:|---:|---:|---:|"]
    for r in result["rows"]:
        lines.append(f"| {r['fusion']} | {r['dtype']} | {'yes' if r.get('compile') else 'no'} | {r['params']:,} | "
                     f"{r['train_questions_per_s']:,.0f} | {r['inference_questions_per_s']:,.0f} | "
                     f"{r.get('warmup_s', float('nan')):.1f} |")
    t = result["time_to_target"]
    reached = t["reached_target"]
    lines += ["", f"Default `mmfuse train`: {t['epochs']} epochs, final test accuracy "
              f"{t['final_test_accuracy']:.2%}, wall time {t['wall_seconds']:.0f} s (data loading and "
              "per-epoch evaluation included); "
              + (f"{TARGET:.0%} first reached after epoch {reached['epoch']} "
                 f"({reached['training_seconds']:.0f} s of training)." if reached else f"{TARGET:.0%} not reached."),
              "", "Test accuracy by epoch: " + ", ".join(f"{a:.4f}" for a in t["accuracy_by_epoch"] if a is not None)]
    return "\n".join(lines)
