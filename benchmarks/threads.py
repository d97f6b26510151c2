"""Training step time per thread count, and what ``--threads``' default picks, on this machine as it is now.

On a 2-core machine another job on one core makes two OpenMP threads spin waiting for each other; this
benchmark times the default easy-VQA model's training step with 1 and with all cores, alternating rounds
so that both meet the same load, and records the load average and ``default_threads()``'s choice.
"""

from __future__ import annotations

import itertools
import os
import tempfile
import time
from typing import Any

from benchmarks.common import markdown_table
from mmfuse.data import load_split
from mmfuse.device import default_threads
from mmfuse.train import TrainConfig, Trainer


def _step_seconds(train, test, threads: int, steps: int) -> float:
    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(TrainConfig(out=out, epochs=1, progress=False, precision="fp32", threads=threads),
                          train_split=train, eval_split=test)
        batches = list(itertools.islice(trainer.batches.epoch(0), steps + 2))
        for batch in batches[:2]:
            trainer.train_step(batch)
        start = time.perf_counter()
        for batch in batches[2:]:
            trainer.train_step(batch)
        trainer.close()
        return (time.perf_counter() - start) / steps


def run(*, quick: bool) -> dict[str, Any]:
    train = load_split("easy-vqa", "train").first_images(64 if quick else 2000)
    test = load_split("easy-vqa", "test").first_images(16)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    counts = sorted({1, cores})
    steps, rounds = (2, 1) if quick else (30, 2)
    rows = []
    for r in range(rounds):
        for threads in counts:
            load = os.getloadavg()[0]
            rows.append({"round": r + 1, "threads": threads, "load_average": load,
                         "step_s": _step_seconds(train, test, threads, steps)})
    return {"rows": rows, "default_threads": default_threads(), "cores": cores,
            "checks": {"step times positive": all(r["step_s"] > 0 for r in rows)}}


def to_markdown(result: dict[str, Any]) -> str:
    table = markdown_table(["round", "threads", "1-min load before", "ms per step"],
                           [[r["round"], r["threads"], f"{r['load_average']:.1f}", f"{1e3 * r['step_s']:.1f}"]
                            for r in result["rows"]])
    return f"{table}\n\n`--threads` default now: {result['default_threads']} of {result['cores']} cores."
