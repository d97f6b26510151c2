"""Peak memory against dataset size: decoded images in memory, or in a file on disk.

A generated JSONL dataset (448 px images: 0.6 MB each decoded; the PNG files are hard links to a few
small images, so generating it costs nothing and decoding still runs for every file) is loaded and
one epoch of image-grouped batches (64 images) is gathered, in a fresh process per point. Three
phases, each with its own peak resident set (Linux ``VmHWM``, reset between phases through
``/proc/self/clear_refs``; the first phase's peak is over the process's own baseline after imports):

- ``load``: decoding the split (``disk``: into the cache file, the first run);
- ``epoch``: gathering every batch of one epoch;
- ``reuse + epoch``: a later run (new process) that finds the cache file and trains an epoch from it.

``memory`` is measured only up to 1 GB (it holds the whole split); ``disk`` up to 4.5 GB, more than the
"bigger than memory" budget of 4 GB. The check: the peak of ``disk`` at the largest size stays within
256 MB of its peak at the smallest (flat), whatever the size. Skipped in ``--quick``, which runs the
same code on a 1.5 MB dataset.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import markdown_table

FULL = {"size": 448, "gigabytes": [0.25, 1.0, 4.5], "memory_up_to": 1.0}
QUICK = {"size": 64, "gigabytes": [0.0005, 0.0015], "memory_up_to": 1.0}
FLAT_MB = 256
MB = 2**20


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status (this benchmark needs Linux)")


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS


def _make_dataset(root: Path, count: int) -> None:
    from PIL import Image

    (root / "images").mkdir(parents=True, exist_ok=True)
    bases = []
    for k in range(8):
        base = root / f"base{k}.png"
        Image.new("RGB", (64, 48), (30 * k, 255 - 30 * k, 100)).save(base)
        bases.append(base)
    lines = []
    for i in range(count):
        name = f"images/{i:05d}.png"
        os.link(bases[i % len(bases)], root / name)
        lines.append(json.dumps({"image": name, "question": "what color is it?", "answer": f"c{i % 8}"}))
    (root / "train.jsonl").write_text("\n".join(lines) + "\n")


def _point(root: str, storage: str, size: int) -> dict:
    """One process: load the split, then gather one epoch; the peak RSS of each phase."""
    import logging

    import torch

    from mmfuse.data import ImageGroupedBatches, load_split

    messages: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())  # type: ignore[method-assign]
    logging.getLogger("mmfuse.data.storage").addHandler(handler)
    logging.getLogger("mmfuse.data.storage").setLevel(logging.INFO)
    base = _status_kib("VmRSS")
    _reset_peak()
    start = time.perf_counter()
    split = load_split(root, "train", image_size=size, progress=False, storage=storage)
    load_s, load_peak = time.perf_counter() - start, _status_kib("VmHWM")
    n = len(split)
    batches = ImageGroupedBatches(split, torch.ones(n, 4, dtype=torch.long), torch.ones(n, 4, dtype=torch.bool),
                                  torch.zeros(n, dtype=torch.long), images_per_batch=64, seed=0)
    _reset_peak()
    epoch_base = _status_kib("VmRSS")
    start = time.perf_counter()
    total = 0
    for batch in batches.epoch(0):
        total += int(batch.images[:, :, ::64, ::64].sum())  # touch the batch
    epoch_s, epoch_peak = time.perf_counter() - start, _status_kib("VmHWM")
    return {"baseline_mb": base / 1024, "load_s": load_s, "load_peak_mb": (load_peak - base) / 1024,
            "epoch_s": epoch_s, "epoch_peak_mb": (epoch_peak - base) / 1024,
            "epoch_growth_mb": (epoch_peak - epoch_base) / 1024, "checksum": total,
            "reused_cache": any("reused" in m for m in messages)}


def _child(root: Path, storage: str, size: int, cache: Path) -> dict:
    env = {**os.environ, "MMFUSE_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "benchmarks.storage", str(root), storage, str(size)], env=env,
                         capture_output=True, text=True, check=True, timeout=3600)
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(*, quick: bool) -> dict:
    p = QUICK if quick else FULL
    per_image = 3 * p["size"] ** 2
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for gb in p["gigabytes"]:
            count = max(8, int(gb * 2**30 / per_image))
            root = Path(tmp) / f"data{count}"
            _make_dataset(root, count)
            cache = Path(tmp) / "cache"
            for storage in ("memory", "disk"):
                if storage == "memory" and gb > p["memory_up_to"]:
                    continue
                first = _child(root, storage, p["size"], cache)
                row = {"storage": storage, "images": count, "decoded_gb": count * per_image / 2**30, "first": first}
                if storage == "disk":
                    row["reuse"] = _child(root, storage, p["size"], cache)
                    row["checksums_agree"] = row["reuse"]["checksum"] == first["checksum"]
                    row["reuse_found_the_cache"] = row["reuse"]["reused_cache"]
                rows.append(row)
            for f in (cache / "images").glob("*.npy"):  # keep the disk use to one dataset at a time
                f.unlink()
    disk = [r for r in rows if r["storage"] == "disk"]
    peaks = [max(r["first"]["load_peak_mb"], r["first"]["epoch_peak_mb"], r["reuse"]["epoch_peak_mb"]) for r in disk]
    memory = {r["images"]: r["first"]["checksum"] for r in rows if r["storage"] == "memory"}
    checks = {
        "disk_peak_flat_across_sizes": max(peaks) - min(peaks) < FLAT_MB,
        "same_pixels_from_disk_and_memory": all(memory.get(r["images"], r["first"]["checksum"])
                                                == r["first"]["checksum"] for r in disk),
        "reuse_reads_the_same_pixels": all(r["checksums_agree"] for r in disk),
        "reuse_finds_the_cache": all(r["reuse_found_the_cache"] for r in disk),
    }
    return {"config": p, "rows": rows, "checks": checks}


def to_markdown(result: dict) -> str:
    table = []
    for r in result["rows"]:
        f = r["first"]
        reuse = r.get("reuse")
        table.append([r["storage"], r["images"], f"{r['decoded_gb']:.2f}", f"{f['load_s']:.1f}",
                      f"{f['load_peak_mb']:.0f}", f"{f['epoch_s']:.1f}", f"{f['epoch_peak_mb']:.0f}",
                      f"{reuse['load_s']:.2f}" if reuse else "-", f"{reuse['epoch_peak_mb']:.0f}" if reuse else "-"])
    return (f"{result['config']['size']} px images; peak RSS above the process's baseline after imports, MB.\n\n"
            + markdown_table(["storage", "images", "decoded GB", "load s", "load peak MB", "epoch s",
                              "epoch peak MB", "reuse load s", "reuse+epoch peak MB"], table))


if __name__ == "__main__":
    print(json.dumps(_point(sys.argv[1], sys.argv[2], int(sys.argv[3]))))
