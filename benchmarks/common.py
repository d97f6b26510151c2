"""Helpers shared by the benchmarks: timing, the machine's matmul rate, the naive baseline, tables."""

from __future__ import annotations

import math
import os
import platform
import statistics
from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from torch.utils import benchmark

# Where the benchmarks run: ``python -m benchmarks.run --device cuda`` sets it (see run.py).
DEVICE = torch.device("cpu")


def environment() -> dict:
    """What the numbers depend on; the load average says how busy the machine was."""
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    env = {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": cpu,
           "cpu_count": os.cpu_count(), "load_average": list(os.getloadavg()),
           "capability": torch.backends.cpu.get_cpu_capability(), "device": str(DEVICE)}
    if DEVICE.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(DEVICE)
    return env


def time_interleaved(calls: dict[str, Callable[[], object]], *, min_run_time: float,
                     rounds: int = 3) -> dict[str, dict]:
    """Median seconds per call of each of ``calls`` with ``Timer.blocked_autorange``, round-robin.

    Each call gets ``rounds`` slots of ``min_run_time / rounds`` seconds, taken in turn, so a busy
    spell on a shared machine slows all of them alike and their ratios stay fair. The median is over
    every block measured; ``min_s`` is the quietest block.
    """
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            timer = benchmark.Timer(stmt="call()", globals={"call": call}, num_threads=torch.get_num_threads())
            times[name] += timer.blocked_autorange(min_run_time=min_run_time / rounds).times
    return {name: {"median_s": statistics.median(t), "min_s": min(t), "runs": len(t)} for name, t in times.items()}


def matmul_gflops(dtype: torch.dtype, n: int, min_run_time: float) -> float:
    """The machine's own (n x n) @ (n x n) rate in GFLOP/s, the ceiling attention is compared to."""
    a, b = torch.randn(n, n, dtype=dtype, device=DEVICE), torch.randn(n, n, dtype=dtype, device=DEVICE)
    seconds = time_interleaved({"matmul": lambda: a @ b}, min_run_time=min_run_time)["matmul"]["median_s"]
    return 2 * n**3 / seconds / 1e9


def naive_attention(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None = None) -> Tensor:
    """What one writes by hand: matmul, softmax, matmul, with the full (B, H, Nq, Nk) matrix."""
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])  # (B, H, Nq, Nk)
    if key_padding_mask is not None:
        scores = scores.masked_fill(~key_padding_mask[:, None, None, :], float("-inf"))
    return scores.softmax(dim=-1) @ v


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def fmt(value: float | None, digits: int = 3) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}g}"
