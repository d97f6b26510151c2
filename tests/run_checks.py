"""Comparisons of run directories shared by the fault tests: two runs that must end identically."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

__all__ = ["VOLATILE", "assert_same_run", "metrics"]

VOLATILE = ("seconds", "questions_per_second")  # wall-clock figures, different in every run


def metrics(run: Path) -> list[dict]:
    """The rows of ``run/metrics.jsonl`` without their wall-clock figures."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [{k: v for k, v in r.items() if k not in VOLATILE} for r in rows]


def assert_same_run(a: Path, b: Path) -> None:
    """The two runs ended with bit-identical weights and the same metrics."""
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=0, atol=0, msg=k)
    assert metrics(b) == metrics(a)
