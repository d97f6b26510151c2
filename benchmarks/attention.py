"""Attention speed: mmfuse ``attend`` vs a naive implementation, and ``CrossAttention`` vs ``nn.MultiheadAttention``.

Two groups, each at the fusion shape (B=64, H=8, Nq=16, Nk=64, D=32, a padded context) and the long
shape (B=1, H=8, Nq=Nk=4096, D=64), in float32 and bfloat16, forward and forward+backward:

* ``kernel``: (B, H, N, D) tensors in, attention out. ``attend(impl="auto")`` and ``chunked`` against
  :func:`benchmarks.common.naive_attention`; at the fusion shape, where ``auto`` runs ``math`` on CPU,
  also PyTorch's fused kernel; at the long fp32 shape also the approximate ``local`` and ``lowrank``
  for scale.
* ``layer``: the full layer with projections, like with like. ``CrossAttention(E, E, num_heads=H)``
  against ``nn.MultiheadAttention(E, H, batch_first=True)`` holding the same weights, with
  ``need_weights=True`` (its default) and ``need_weights=False``.

Every case is first checked against a float32 reference computed by the ``math`` path (output, and
for forward+backward the input gradients); only then is it timed. Achieved GFLOP/s count the forward
attention FLOPs (4 B H Nq Nk D; forward+backward counts 3x that) and are compared to the fp32 matmul
rate measured in the same process.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch import Tensor, nn

from benchmarks import common
from benchmarks.common import fmt, markdown_table, matmul_gflops, naive_attention, time_interleaved
from mmfuse.attention import SMALL_SCORES, attend, flops
from mmfuse.layers import CrossAttention

SHAPES = {
    "fusion": {"B": 64, "H": 8, "Nq": 16, "Nk": 64, "D": 32, "masked": True},
    "long": {"B": 1, "H": 8, "Nq": 4096, "Nk": 4096, "D": 64, "masked": False},
}
QUICK_SHAPES = {
    "fusion": {"B": 4, "H": 2, "Nq": 8, "Nk": 16, "D": 8, "masked": True},
    "long": {"B": 1, "H": 2, "Nq": 256, "Nk": 256, "D": 16, "masked": False},
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# Largest error allowed relative to the reference's largest magnitude.
TOLERANCE = {"fp32": 1e-4, "bf16": 3e-2}
EXACT = ("mmfuse auto", "naive", "mmfuse chunked", "torch fused SDPA", "CrossAttention (auto)", "MHA need_weights=True",
         "MHA need_weights=False")
# These run plain matmuls, so their forward time is predictable from the machine's matmul rate; on a CPU
# without bf16 units that rate is ~1 GFLOP/s and the long bf16 shape would take minutes.
EXPLICIT = ("naive", "MHA need_weights=True")


def _rel_err(actual: Tensor, expected: Tensor) -> float:
    return float((actual.float() - expected).abs().max() / expected.abs().max().clamp_min(1e-12))


def _mask(B: int, Nk: int) -> Tensor:
    """Context padding as in a real batch: sample b keeps a different number of tokens (at least half)."""
    lengths = torch.linspace(Nk // 2, Nk, B).round().long()
    return torch.arange(Nk)[None, :] < lengths[:, None]  # (B, Nk)


# A case: fn(*inputs, mask) -> out, and the parameters it also differentiates in forward+backward.
Case = tuple[Callable[..., Tensor], list[Tensor]]


def _kernel_cases(shape: dict, dtype_name: str) -> dict[str, Case]:
    cases: dict[str, Case] = {
        "mmfuse auto": (lambda q, k, v, m: attend(q, k, v, key_padding_mask=m)[0], []),
        "naive": (naive_attention, []),
        "mmfuse chunked": (lambda q, k, v, m: attend(q, k, v, key_padding_mask=m, impl="chunked")[0], []),
    }
    if shape["Nq"] * shape["Nk"] <= SMALL_SCORES:  # auto runs math on CPU here; show the kernel it passes over
        sdpa = nn.functional.scaled_dot_product_attention
        cases["torch fused SDPA"] = (
            lambda q, k, v, m: sdpa(q, k, v, attn_mask=None if m is None else m[:, None, None]), [])
    if shape["Nk"] >= 1024 and dtype_name == "fp32":
        window, rank = 256, 256
        E, F = (torch.randn(rank, shape["Nk"], device=common.DEVICE) / shape["Nk"] ** 0.5 for _ in range(2))
        cases["mmfuse local (window 256, 16 global)"] = (
            lambda q, k, v, m: attend(q, k, v, key_padding_mask=m, impl="local", window=window, num_global=16)[0], [])
        cases["mmfuse lowrank (rank 256)"] = (
            lambda q, k, v, m: attend(q, k, v, key_padding_mask=m, impl="lowrank", proj_k=E, proj_v=F)[0], [])
    return cases


def _layer_cases(shape: dict, dtype: torch.dtype) -> tuple[dict[str, Case], Callable[..., Tensor]]:
    """The three layers holding the same weights, and a float32 ``math`` CrossAttention as reference."""
    E, H = shape["H"] * shape["D"], shape["H"]
    layer = CrossAttention(E, E, num_heads=H)
    reference = CrossAttention(E, E, num_heads=H, impl="math")
    reference.load_state_dict(layer.state_dict())
    mha = nn.MultiheadAttention(E, H, batch_first=True)
    with torch.no_grad():
        mha.in_proj_weight.copy_(torch.cat([layer.q_proj.weight, layer.k_proj.weight, layer.v_proj.weight]))
        mha.in_proj_bias.copy_(torch.cat([layer.q_proj.bias, layer.k_proj.bias, layer.v_proj.bias]))
        mha.out_proj.load_state_dict(layer.out_proj.state_dict())
    layer, mha = layer.to(common.DEVICE, dtype).eval(), mha.to(common.DEVICE, dtype).eval()
    reference.to(common.DEVICE)

    def mha_fn(need_weights: bool) -> Callable[..., Tensor]:
        def fn(x: Tensor, ctx: Tensor, m: Tensor | None) -> Tensor:
            pad = None if m is None else ~m
            return mha(x, ctx, ctx, key_padding_mask=pad, need_weights=need_weights)[0]
        return fn

    cases = {
        "CrossAttention (auto)": (lambda x, ctx, m: layer(x, ctx, context_mask=m)[0], list(layer.parameters())),
        "MHA need_weights=True": (mha_fn(True), list(mha.parameters())),
        "MHA need_weights=False": (mha_fn(False), list(mha.parameters())),
    }
    return cases, lambda x, ctx, m: reference(x, ctx, context_mask=m)[0]


def _reference(fn: Callable[..., Tensor], inputs: list[Tensor], mask: Tensor | None, g: Tensor):
    inputs = [x.detach().requires_grad_() for x in inputs]
    out = fn(*inputs, mask)
    return out.detach(), [t.detach() for t in torch.autograd.grad(out, inputs, g)]


def _check(fn: Callable[..., Tensor], inputs: list[Tensor], params: list[Tensor], mask: Tensor | None,
           g: Tensor, ref: tuple[Tensor, list[Tensor]], *, exact: bool, tol: float,
           cap_s: float) -> tuple[dict, dict[str, Callable[[], object]]]:
    """Check one case against the reference (forward, then gradients) and return its callables to time.

    The checking calls double as warm-up. A mode whose checking call took longer than ``cap_s`` keeps
    that one call as its measurement, and a forward that slow skips forward+backward.
    """
    row: dict = {}
    timed: dict[str, Callable[[], object]] = {}

    def forward() -> Tensor:
        with torch.no_grad():
            return fn(*inputs, mask)

    start = time.perf_counter()
    out = forward()
    first = time.perf_counter() - start
    row["fwd_err"] = _rel_err(out, ref[0]) if exact else None
    row["ok"] = bool(torch.isfinite(out).all()) and (not exact or row["fwd_err"] <= tol)
    if first > cap_s:
        row["fwd"] = {"median_s": first, "runs": 1}
        row["fwd_bwd"] = {"skipped": f"forward alone took {first:.0f} s"}
        return row, timed
    timed["fwd"] = forward
    leaves = [x.detach().requires_grad_() for x in inputs]
    g = g.to(inputs[0].dtype)

    def forward_backward() -> tuple[Tensor, ...]:
        return torch.autograd.grad(fn(*leaves, mask), leaves + params, g)

    start = time.perf_counter()
    grads = forward_backward()
    first = time.perf_counter() - start
    if exact:
        # Compare the input gradients; parameter gradients (layers) come after them.
        row["grad_err"] = max(_rel_err(a, b) for a, b in zip(grads[:len(ref[1])], ref[1], strict=True))
        row["ok"] = row["ok"] and row["grad_err"] <= tol
    if first > cap_s:
        row["fwd_bwd"] = {"median_s": first, "runs": 1}
    else:
        timed["fwd_bwd"] = forward_backward
    return row, timed


def run(*, quick: bool) -> dict:
    shapes = QUICK_SHAPES if quick else SHAPES
    min_run_time, cap_s = (0.01, 2.0) if quick else (1.0, 5.0)
    rates = {"fp32": matmul_gflops(torch.float32, 256 if quick else 2048, min_run_time),
             "bf16": matmul_gflops(torch.bfloat16, 128 if quick else 512, min_run_time)}
    rows = []
    for shape_name, shape in shapes.items():
        B, H, Nq, Nk, D = (shape[key] for key in ("B", "H", "Nq", "Nk", "D"))
        E = H * D
        gen = torch.Generator().manual_seed(0)
        dev = common.DEVICE
        q, k, v = (torch.randn(B, H, n, D, generator=gen).to(dev) for n in (Nq, Nk, Nk))
        x, ctx = torch.randn(B, Nq, E, generator=gen).to(dev), torch.randn(B, Nk, E, generator=gen).to(dev)
        mask = _mask(B, Nk).to(dev) if shape["masked"] else None
        g_kernel = torch.randn(B, H, Nq, D, generator=gen).to(dev)
        g_layer = torch.randn(B, Nq, E, generator=gen).to(dev)
        ref_kernel = _reference(lambda q, k, v, m: attend(q, k, v, key_padding_mask=m, impl="math")[0],
                                [q, k, v], mask, g_kernel)
        for dtype_name, dtype in DTYPES.items():
            layer_cases, ref_layer = _layer_cases(shape, dtype)
            ref_layer_out = _reference(ref_layer, [x, ctx], mask, g_layer)
            groups = [("kernel", _kernel_cases(shape, dtype_name), [q, k, v], g_kernel, ref_kernel),
                      ("layer", layer_cases, [x, ctx], g_layer, ref_layer_out)]
            for group, cases, inputs, g, ref in groups:
                inputs = [t.to(dtype) for t in inputs]
                group_rows, to_time = {}, {"fwd": {}, "fwd_bwd": {}}
                for impl, (fn, params) in cases.items():
                    row = {"shape": shape_name, "dtype": dtype_name, "group": group, "impl": impl,
                           "flops": flops(B, H, Nq, Nk, D)}
                    predicted = row["flops"] / (rates[dtype_name] * 1e9)
                    if impl in EXPLICIT and predicted > 3 * cap_s:
                        skipped = {"skipped": f"predicted {predicted:.0f} s at the {dtype_name} matmul rate"}
                        group_rows[impl] = row | {"fwd": skipped, "fwd_bwd": skipped}
                        continue
                    checked, timed = _check(fn, inputs, params, mask, g, ref, exact=impl in EXACT,
                                            tol=TOLERANCE[dtype_name], cap_s=cap_s)
                    group_rows[impl] = row | checked
                    for mode, call in timed.items():
                        to_time[mode][impl] = call
                # The cases compared with each other are timed round-robin (see time_interleaved).
                for mode, calls in to_time.items():
                    for impl, timing in time_interleaved(calls, min_run_time=min_run_time).items():
                        group_rows[impl][mode] = timing
                rows += group_rows.values()
    return {"shapes": shapes, "matmul_gflops": rates, "rows": rows,
            "checks": {f"{r['shape']}/{r['dtype']}/{r['impl']}": r["ok"] for r in rows if "ok" in r},
            "targets": _targets(rows, rates)}


def _time(rows: list[dict], mode: str, **where) -> float | None:
    for row in rows:
        if all(row[key] == value for key, value in where.items()):
            return row[mode].get("median_s")
    return None


def _targets(rows: list[dict], rates: dict) -> list[dict]:
    targets = []

    def add(name: str, value: float | None, target: float | None) -> None:
        met = None if value is None or target is None else value >= target
        targets.append({"name": name, "value": value, "target": target, "met": met})

    auto, naive = (_time(rows, "fwd_bwd", shape="long", dtype="fp32", impl=i) for i in ("mmfuse auto", "naive"))
    add("long fp32 fwd+bwd: naive time / auto time", naive / auto if auto and naive else None, 4.0)
    for shape in ("fusion", "long"):
        for dtype in DTYPES:
            for mode in ("fwd", "fwd_bwd"):
                ours = _time(rows, mode, shape=shape, dtype=dtype, impl="CrossAttention (auto)")
                mha = [_time(rows, mode, shape=shape, dtype=dtype, impl=f"MHA need_weights={w}")
                       for w in (True, False)]
                mha = [t for t in mha if t is not None]
                add(f"{shape} {dtype} {mode}: best MHA time / CrossAttention time",
                    min(mha) / ours if ours and mha else None, 1.0)
    for dtype in DTYPES:
        seconds = _time(rows, "fwd", shape="long", dtype=dtype, impl="mmfuse auto")
        row = next(r for r in rows if (r["shape"], r["dtype"], r["impl"]) == ("long", dtype, "mmfuse auto"))
        achieved = row["flops"] / seconds / 1e9 if seconds else None
        add(f"long {dtype} fwd: auto GFLOP/s / fp32 matmul GFLOP/s",
            achieved / rates["fp32"] if achieved else None, 0.6 if dtype == "fp32" else None)
    return targets


def to_markdown(result: dict) -> str:
    rates = result["matmul_gflops"]
    parts = [f"Matmul rate in this process: fp32 {rates['fp32']:.1f} GFLOP/s, bf16 {rates['bf16']:.2f} GFLOP/s."]
    for group, versus in (("kernel", "naive"), ("layer", None)):
        table = []
        for row in (r for r in result["rows"] if r["group"] == group):
            for mode, factor in (("fwd", 1), ("fwd_bwd", 3)):
                timing = row[mode]
                if "skipped" in timing:
                    table.append([row["shape"], row["dtype"], mode, row["impl"], f"skipped: {timing['skipped']}",
                                  "", "", "", ""])
                    continue
                seconds = timing["median_s"]
                gflops = factor * row["flops"] / seconds / 1e9
                base = versus or "MHA need_weights=True"
                base_s = _time(result["rows"], mode, shape=row["shape"], dtype=row["dtype"], impl=base)
                err = row.get("grad_err") if mode == "fwd_bwd" else row.get("fwd_err")
                table.append([row["shape"], row["dtype"], mode, row["impl"], fmt(seconds * 1e3),
                              fmt(gflops), f"{gflops / rates['fp32']:.0%}",
                              fmt(base_s / seconds) if base_s else "-",
                              ("" if row["ok"] else "FAIL ") + fmt(err, 2)])
        parts.append(markdown_table(["shape", "dtype", "mode", group, "ms", "GFLOP/s", "of fp32 matmul",
                                     f"speed-up vs {versus or 'MHA weights=True'}", "max rel err"], table))
    parts.append(markdown_table(["target", "value", "wanted", "met"],
                                [[t["name"], fmt(t["value"]), "-" if t["target"] is None else f">= {t['target']}",
                                  "-" if t["met"] is None else t["met"]]
                                 for t in result["targets"]]))
    return "\n\n".join(parts)
