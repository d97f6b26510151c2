"""Where and in what precision to run: device and precision resolution, autocast, thread count.

``resolve_device("auto")`` is CUDA when available, else MPS, else the CPU. ``resolve_precision("auto",
device)`` is bf16 on CUDA GPUs that support it and on CPUs with native bf16 matrix units (AMX), fp32
otherwise: CPUs that only emulate bf16 (AVX2) run it many times slower than fp32, and AVX512-BF16 alone
(dot-product instructions, no tile unit) was measured slower than fp32 on mmfuse's training step (see
``benchmarks/README.md``), so ``auto`` never picks it there. fp16 is offered on CUDA with a gradient
scaler (the trainer checkpoints the scaler's state).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import time
from collections.abc import Iterator
from typing import Literal

import torch

__all__ = [
    "DEVICES",
    "PRECISIONS",
    "autocast",
    "autocast_dtype",
    "busy_cores",
    "cpu_bf16_support",
    "default_threads",
    "resolve_device",
    "resolve_precision",
]

log = logging.getLogger(__name__)

DEVICES = ("auto", "cpu", "cuda", "mps")  # "cuda:N" is accepted too
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
Precision = Literal["fp32", "bf16", "fp16"]


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """``auto`` | ``cpu`` | ``cuda`` | ``cuda:N`` | ``mps`` -> a device that exists here, or ``ValueError``."""
    if isinstance(spec, torch.device):
        spec = str(spec)
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(spec)
    except RuntimeError as e:
        raise ValueError(f"unknown device {spec!r}; use auto, cpu, cuda, cuda:N or mps") from e
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {spec!r}: CUDA is not available on this machine (torch {torch.__version__}, "
                             f"built {'with' if torch.backends.cuda.is_built() else 'without'} CUDA)")
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index >= torch.cuda.device_count():
            raise ValueError(f"device {spec!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
        return torch.device("cuda", index)
    if device.type == "mps" and not _mps_available():
        raise ValueError(f"device {spec!r}: MPS is not available on this machine")
    if device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"unsupported device {spec!r}; use auto, cpu, cuda, cuda:N or mps")
    return device


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


@functools.lru_cache(maxsize=1)
def cpu_bf16_support() -> Literal["amx", "avx512_bf16", "none"]:
    """The CPU's native bf16 matrix support, read from ``/proc/cpuinfo`` (``none`` where unreadable)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            flags: set[str] = set()
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        return "none"
    if "amx_bf16" in flags:
        return "amx"
    if "avx512_bf16" in flags:
        return "avx512_bf16"
    return "none"


def resolve_precision(spec: str | None, device: torch.device) -> Precision:
    """``auto`` | ``fp32`` | ``bf16`` | ``fp16`` for ``device``; ``ValueError`` for what it cannot run."""
    spec = (spec or "auto").strip().lower()
    if spec not in PRECISIONS:
        raise ValueError(f"unknown precision {spec!r}; choose one of {PRECISIONS}")
    if spec == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
        if device.type == "cpu":
            return "bf16" if cpu_bf16_support() == "amx" else "fp32"
        return "fp32"
    if spec == "fp16" and device.type == "cpu":
        raise ValueError("precision fp16 needs a GPU (CPU autocast runs fp16 matmuls emulated); use bf16 or fp32")
    return spec  # type: ignore[return-value]


def autocast_dtype(precision: str) -> torch.dtype | None:
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)


@contextlib.contextmanager
def autocast(device: torch.device, precision: str) -> Iterator[None]:
    """Autocast on ``device``'s type in ``precision`` (a no-op for fp32)."""
    dtype = autocast_dtype(precision)
    if dtype is None:
        yield
        return
    with torch.autocast(device.type, dtype=dtype):
        yield


def busy_cores(interval: float = 0.3) -> float | None:
    """How many cores other work keeps busy right now: the non-idle share of ``/proc/stat``'s CPU time over
    ``interval`` seconds, times the core count (None where unreadable). Unlike the 1-minute load average,
    it does not linger for a minute after a job ends."""

    def sample() -> tuple[int, int]:
        with open("/proc/stat", encoding="ascii") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        return idle, sum(fields[:8])

    try:
        idle0, total0 = sample()
        time.sleep(interval)
        idle1, total1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    if total1 <= total0:
        return None
    return (1.0 - (idle1 - idle0) / (total1 - total0)) * (os.cpu_count() or 1)


def default_threads(cpus: int | None = None, busy: float | None = None) -> int:
    """Intra-op threads for a CPU run: the cores that are not already busy, at least one.

    OpenMP threads spin while they wait for each other; on a 2-core machine where another process keeps
    one core busy, two threads ran a training step 7-10x slower than one (``benchmarks/threads.py``). So
    the default counts the cores other work is using now (:func:`busy_cores`; the 1-minute load average
    where ``/proc/stat`` is unreadable) against the cores available to this process.
    """
    if cpus is None:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if busy is None:
        busy = busy_cores()
    if busy is None:
        try:
            busy = os.getloadavg()[0]
        except OSError:
            busy = 0.0
    return max(1, min(cpus, cpus - int(busy + 0.5)))
