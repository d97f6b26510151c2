"""The benchmark suite runs (on tiny shapes) and its correctness checks pass, so it cannot rot."""

import json

import pytest

from benchmarks.run import BENCHMARKS, main

EXPECTED_KEYS = {
    "attention": {"shapes", "matmul_gflops", "rows", "targets"},
    "features": {"config", "rows", "speedup"},
    "memory": {"config", "rows"},
    "storage": {"config", "rows"},
    "training": {"rows", "time_to_target", "native_bf16"},
    "serve": {"rows", "speedup_at_32", "threads"},
    "generation": {"rows", "quality"},
    "threads": {"rows", "default_threads", "cores"},
    "masks": {"shape", "rows"},
}


def test_every_benchmark_is_covered_here():
    assert set(EXPECTED_KEYS) == set(BENCHMARKS)


@pytest.mark.slow
@pytest.mark.usefixtures("single_thread")  # main() sets the thread count; the fixture restores it
@pytest.mark.parametrize("name", sorted(BENCHMARKS))
def test_quick_benchmark_runs_and_its_checks_pass(name, tmp_path, capsys):
    assert main(["--quick", "--only", name, "--threads", "1", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / f"{name}.json").read_text())
    assert {"name", "quick", "seconds", "environment", "checks"} | EXPECTED_KEYS[name] <= set(result)
    assert result["name"] == name and result["quick"] is True
    assert result["checks"] and all(result["checks"].values()), result["checks"]
    assert result["rows"]
    assert f"## {name} (quick)" in capsys.readouterr().out
    if name == "attention":
        # What the README tables are made from: kernel and layer rows, both modes timed and checked.
        assert {r["group"] for r in result["rows"]} == {"kernel", "layer"}
        row = next(r for r in result["rows"] if r["impl"] == "mmfuse auto" and r["dtype"] == "fp32")
        assert row["fwd"]["median_s"] > 0 and row["fwd_bwd"]["median_s"] > 0
        assert row["fwd_err"] < 1e-4 and row["grad_err"] < 1e-4
    if name == "memory":
        assert all(r["peak_delta_bytes"] >= 0 for r in result["rows"])
    if name == "serve":
        assert {(r["model"], r["setting"], r["concurrency"]) for r in result["rows"]} == {
            (m, s, c) for m in ("default",) for s in ("batching", "no batching") for c in (1, 8, 32)}
        assert all(r["requests_per_s"] > 0 and r["p99_ms"] >= r["p50_ms"] for r in result["rows"])
    if name == "generation":
        assert all(r["same_tokens"] and r["speedup"] > 1 for r in result["rows"])
        assert {"exact_match", "bleu4", "cider"} <= set(result["quality"]["held_out"])
    if name == "training":
        assert all(r["train_questions_per_s"] > 0 and r["inference_questions_per_s"] > 0 for r in result["rows"])
        assert 0.0 <= result["time_to_target"]["final_test_accuracy"] <= 1.0
