"""What selecting padded keys and values away costs: ``attend`` with and without the selection.

:func:`mmfuse.attention.attend` replaces padded keys and values by zeros (a selection) before any
implementation runs, so NaN or Inf there never matter. This times forward+backward at the fusion shape
(B=64, H=8, Nq=16, Nk=64, D=32, a padded mask) with the selection as shipped and with it switched off
(padded values passed through as they are, which is exact only when they are finite), interleaved in
one process, and reports the ratio per implementation.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any

import torch

import mmfuse.attention as attention
from benchmarks.common import DEVICE, markdown_table, time_interleaved

__all__ = ["run", "to_markdown"]

SHAPE = {"B": 64, "H": 8, "Nq": 16, "Nk": 64, "D": 32}
QUICK_SHAPE = {"B": 4, "H": 2, "Nq": 8, "Nk": 16, "D": 8}
IMPLS = {"auto": {}, "chunked": {}, "local": {"window": 16, "num_global": 2}}


@contextmanager
def _without_selection():
    selected = attention._zero_padded
    attention._zero_padded = lambda k, v, keep: (k, v)
    try:
        yield
    finally:
        attention._zero_padded = selected


def run(*, quick: bool) -> dict[str, Any]:
    shape = QUICK_SHAPE if quick else SHAPE
    B, H, Nq, Nk, D = (shape[n] for n in ("B", "H", "Nq", "Nk", "D"))
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, n, D, generator=g).to(DEVICE).requires_grad_() for n in (Nq, Nk, Nk))
    mask = (torch.arange(Nk)[None] < torch.randint(1, Nk + 1, (B,), generator=g)[:, None]).to(DEVICE)
    grad = torch.randn(B, H, Nq, D, generator=g).to(DEVICE)
    rows, checks = [], {}
    for impl, options in IMPLS.items():
        def step(impl: str = impl, options: dict = options) -> tuple[torch.Tensor, ...]:
            out = attention.attend(q, k, v, key_padding_mask=mask, impl=impl, **options)[0]
            return (out, *torch.autograd.grad(out, (q, k, v), grad))

        def step_without(step=step) -> tuple[torch.Tensor, ...]:
            with _without_selection():
                return step()

        # On finite inputs both give the same numbers: only the time differs.
        checks[f"{impl}: same result without the selection"] = all(
            torch.equal(a, b) for a, b in zip(step(), step_without(), strict=True))
        timed = time_interleaved({"selected": step, "not selected": step_without},
                                 min_run_time=0.3 if quick else 6.0, rounds=2 if quick else 6)
        rows.append({"impl": impl, "selected_s": timed["selected"]["median_s"],
                     "not_selected_s": timed["not selected"]["median_s"],
                     "ratio": timed["selected"]["median_s"] / timed["not selected"]["median_s"]})
    return {"shape": shape, "rows": rows, "checks": checks}


def to_markdown(result: dict[str, Any]) -> str:
    s = result["shape"]
    head = (f"attend forward+backward, B={s['B']}, H={s['H']}, Nq={s['Nq']}, Nk={s['Nk']}, D={s['D']}, "
            "padded mask: padded keys/values selected away vs passed through")
    table = markdown_table(["impl", "selected ms", "not selected ms", "ratio"],
                           [[r["impl"], f"{r['selected_s'] * 1e3:.2f}", f"{r['not_selected_s'] * 1e3:.2f}",
                             f"{r['ratio']:.2f}"] for r in result["rows"]])
    return head + "\n\n" + table
