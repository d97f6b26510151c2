"""Peak memory of attention forward+backward against sequence length (self-attention, Nq = Nk = N).

Each point runs in a fresh subprocess: it warms up on a tiny problem, allocates q, k, v and the
output gradient, resets the peak resident set size to the current one, runs forward and backward once
and reads the peak again. The difference is the extra memory the implementation needs, gradients
included. The peak is Linux's ``VmHWM``, reset through ``/proc/self/clear_refs``: ``ru_maxrss`` would
do without the reset, but Linux carries it over from the parent across fork and exec, so a child of
a benchmark that has just used gigabytes would report nothing.
``math`` is skipped where its quadratic score matrices would exceed ``MATH_LIMIT_GIB``, predicted from
its largest measured point.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from benchmarks.common import markdown_table

IMPLS = ("math", "auto", "chunked", "local")
OPTIONS = {"local": {"window": 256, "num_global": 16}}
FULL = {"lengths": [512, 2048, 8192, 32768], "heads": 8, "head_dim": 64}
QUICK = {"lengths": [256], "heads": 2, "head_dim": 16}
MATH_LIMIT_GIB = 8.0
LINEAR_FACTOR = 1.5  # 4x the length may cost at most 1.5 * 4x the memory to count as linear
GIB = 2**30


def _status_kib(field: str) -> int:
    """A memory field of /proc/self/status (VmRSS: resident now, VmHWM: peak resident), in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status (the memory benchmark needs Linux)")


def _point(impl: str, n: int, heads: int, head_dim: int, threads: int) -> dict:
    """Runs in the subprocess: peak RSS growth of one forward+backward."""
    import gc

    from mmfuse.attention import attend

    torch.set_num_threads(threads)

    def step(q, k, v, g):
        out, _ = attend(q, k, v, impl=impl, **OPTIONS.get(impl, {}))
        out.backward(g)

    def inputs(length: int):
        q, k, v = (torch.randn(1, heads, length, head_dim, requires_grad=True) for _ in range(3))
        return q, k, v, torch.randn(1, heads, length, head_dim)

    step(*inputs(64))  # load kernels and start the thread pool outside the measurement
    tensors = inputs(n)
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # peak RSS := current RSS
    before = _status_kib("VmRSS")
    start = time.perf_counter()
    step(*tensors)
    seconds = time.perf_counter() - start
    return {"peak_delta_bytes": (_status_kib("VmHWM") - before) * 1024, "seconds": seconds,
            "finite": all(bool(torch.isfinite(t.grad).all()) for t in tensors[:3])}


def _run_point(impl: str, n: int, config: dict) -> dict:
    spec = json.dumps({"impl": impl, "n": n, "heads": config["heads"], "head_dim": config["head_dim"],
                       "threads": torch.get_num_threads()})
    proc = subprocess.run([sys.executable, "-m", "benchmarks.memory", spec], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1], timeout=900, check=False)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run(*, quick: bool) -> dict:
    config = QUICK if quick else FULL
    rows = []
    for impl in IMPLS:
        bytes_per_score = None  # math only: measured bytes per (head, query, key), for the prediction
        for n in config["lengths"]:
            row = {"impl": impl, "n": n}
            scores = config["heads"] * n * n
            predicted = bytes_per_score * scores if bytes_per_score else None
            if impl == "math" and predicted and predicted > MATH_LIMIT_GIB * GIB:
                row["skipped"] = f"needs ~{predicted / GIB:.0f} GiB"
            else:
                row |= _run_point(impl, n, config)
                if impl == "math" and "peak_delta_bytes" in row:
                    bytes_per_score = row["peak_delta_bytes"] / scores
            rows.append(row)
    return {"config": config | {"options": OPTIONS}, "rows": rows, "checks": _checks(rows, config, quick)}


def _peak(rows: list[dict], impl: str, n: int) -> float | None:
    return next((r.get("peak_delta_bytes") for r in rows if r["impl"] == impl and r["n"] == n), None)


def _checks(rows: list[dict], config: dict, quick: bool) -> dict:
    checks = {f"{r['impl']}/{r['n']} ran": "skipped" in r or ("error" not in r and r["finite"]) for r in rows}
    if not quick:
        longest, previous = config["lengths"][-1], config["lengths"][-2]
        growth = longest / previous
        for impl in ("chunked", "local"):
            big, small = _peak(rows, impl, longest), _peak(rows, impl, previous)
            checks[f"{impl} grows linearly"] = bool(big and small and big <= LINEAR_FACTOR * growth * small)
        big = _peak(rows, "chunked", longest)
        checks[f"chunked at N={longest} needs < 1 GiB"] = bool(big is not None and big < GIB)
    return checks


def to_markdown(result: dict) -> str:
    lengths = result["config"]["lengths"]
    table = []
    for impl in IMPLS:
        cells = []
        for n in lengths:
            row = next(r for r in result["rows"] if r["impl"] == impl and r["n"] == n)
            if "skipped" in row:
                cells.append(f"skipped: {row['skipped']}")
            elif "error" in row:
                cells.append(f"error: {row['error']}")
            else:
                cells.append(f"{row['peak_delta_bytes'] / 2**20:,.0f} MiB ({row['seconds']:.1f} s)")
        table.append([impl, *cells])
    config = result["config"]
    head = (f"Peak RSS growth of one forward+backward, B=1, H={config['heads']}, D={config['head_dim']}, fp32, "
            f"Nq = Nk = N (local: {config['options']['local']}); in brackets the time of that step.")
    return head + "\n\n" + markdown_table(["impl", *[f"N={n}" for n in lengths]], table)


if __name__ == "__main__":
    spec = json.loads(sys.argv[1])
    print(json.dumps(_point(spec["impl"], spec["n"], spec["heads"], spec["head_dim"], spec["threads"])))
