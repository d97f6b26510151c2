"""Epoch time with a frozen pretrained vision backbone, with and without the frozen-feature cache.

A ViT of ViT-Tiny's width (192, 3 heads; 4 layers, 64 px images, 8 px patches: 65 tokens) with random
weights, saved to a temporary folder and loaded as ``--vision hf:PATH`` would; a VQA model (fusion
transformer) trains on generated images, 4 questions each. "no cache" runs the backbone on every batch,
as training did before the cache; "cache" trains on the tokens computed once (``build_s``, the one-time
cost, is reported apart; a later run on the same images skips it too). The two kinds of epoch
alternate, so a busy spell on the shared machine slows both alike. Checks: the model's logits from
cached tokens equal those from raw images, and a second run reuses the cache without running the
backbone.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from typing import Any

import torch

from benchmarks.common import fmt, markdown_table
from mmfuse.data import ImageGroupedBatches, VQASplit, encode_answers
from mmfuse.tasks.vqa import VQATask

FULL = {"images": 512, "size": 64, "hidden": 192, "layers": 4, "heads": 3, "rounds": 3}
QUICK = {"images": 16, "size": 32, "hidden": 32, "layers": 1, "heads": 2, "rounds": 1}
QUESTIONS = ["what color is the shape?", "what shape is it?", "is there a red shape?", "is it large?"]


def _vit(folder: str, p: dict[str, Any]) -> None:
    import transformers

    torch.manual_seed(0)
    config = transformers.ViTConfig(image_size=p["size"], patch_size=8, hidden_size=p["hidden"],
                                    num_hidden_layers=p["layers"], num_attention_heads=p["heads"],
                                    intermediate_size=4 * p["hidden"])
    transformers.ViTModel(config, add_pooling_layer=False).save_pretrained(folder)
    transformers.ViTImageProcessorPil(size={"height": p["size"], "width": p["size"]}).save_pretrained(folder)


def _split(p: dict[str, Any]) -> VQASplit:
    g = torch.Generator().manual_seed(0)
    M = p["images"]
    images = torch.randint(0, 256, (M, 3, p["size"], p["size"]), generator=g, dtype=torch.uint8)
    answers = ["red", "circle", "yes", "no"]
    return VQASplit(images=images, image_index=torch.arange(M).repeat_interleave(len(QUESTIONS)),
                    questions=QUESTIONS * M, answers=[answers[(i * 7) % 4] for i in range(4 * M)],
                    answer_types=None, image_paths=[f"generated/{i}" for i in range(M)], name="generated")


def _epoch(task: VQATask, model: torch.nn.Module, batches: Any, optimizer: torch.optim.Optimizer) -> float:
    start = time.perf_counter()
    for batch in batches.epoch(0):
        loss = task.step(model, batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return time.perf_counter() - start


def run(*, quick: bool) -> dict:
    p = QUICK if quick else FULL
    old_cache = os.environ.get("MMFUSE_CACHE")
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["MMFUSE_CACHE"] = os.path.join(tmp, "cache")
        try:
            folder = os.path.join(tmp, "vit")
            _vit(folder, p)
            split = _split(p)
            task = VQATask()
            model = task.build_model({"vision": f"hf:{folder}", "dim": 64, "num_heads": 4, "depth": 1}, split)
            model.train()
            optimizer = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-3)
            ids, mask = model.tokenize(split.questions)
            raw = ImageGroupedBatches(split, ids, mask, encode_answers(split.answers, model.answers),
                                      images_per_batch=32, shuffle=False)
            start = time.perf_counter()
            cached = task.batches(model, split, batch_size=32, shuffle=False)
            build_s = time.perf_counter() - start
            start = time.perf_counter()
            task.batches(model, split, batch_size=32, shuffle=False)  # a later run: the cache is reused
            reuse_s = time.perf_counter() - start

            model.eval()
            with torch.no_grad():
                b_raw, b_cached = next(iter(raw.epoch(0))), next(iter(cached.epoch(0)))
                max_diff = float((model(b_raw.images, b_raw.tokens, b_raw.text_mask, b_raw.image_index)
                                  - model(b_cached.images, b_cached.tokens, b_cached.text_mask,
                                          b_cached.image_index)).abs().max())
            model.train()
            times: dict[str, list[float]] = {"no cache": [], "cache": []}
            _epoch(task, model, cached, optimizer)  # warm-up
            for _ in range(p["rounds"]):
                times["no cache"].append(_epoch(task, model, raw, optimizer))
                times["cache"].append(_epoch(task, model, cached, optimizer))
        finally:
            if old_cache is None:
                os.environ.pop("MMFUSE_CACHE", None)
            else:
                os.environ["MMFUSE_CACHE"] = old_cache
    no_cache, cache = statistics.median(times["no cache"]), statistics.median(times["cache"])
    rows = [{"mode": "no cache", "epoch_s": no_cache, "epoch_times": times["no cache"]},
            {"mode": "cache", "epoch_s": cache, "epoch_times": times["cache"], "build_s": build_s,
             "reuse_s": reuse_s}]
    return {"config": p, "rows": rows, "speedup": no_cache / cache,
            "checks": {"cached_tokens_give_the_same_logits": max_diff < 1e-4,
                       "reuse_is_faster_than_build": reuse_s < build_s}}


def to_markdown(result: dict) -> str:
    p = result["config"]
    head = (f"{p['images']} images x 4 questions, ViT hidden {p['hidden']}, {p['layers']} layers, {p['size']} px, "
            f"frozen; median of {p['rounds']} epochs each, alternated.\n\n")
    rows = [[r["mode"], fmt(r["epoch_s"]), fmt(r.get("build_s")), fmt(r.get("reuse_s"))] for r in result["rows"]]
    return head + markdown_table(["", "epoch s", "cache build s (once)", "cache reuse s (later runs)"], rows) + (
        f"\n\nepoch speedup with the cache: {result['speedup']:.1f}x")
