"""Run the benchmarks, write one JSON file each and print their markdown tables.

    python -m benchmarks.run                      # everything, full size (~10 minutes on 2 cores)
    python -m benchmarks.run --quick              # every benchmark on tiny shapes, in seconds
    python -m benchmarks.run --only attention --threads 2 --out DIR
    python -m benchmarks.run --only attention --device cuda   # the attention benchmark on a GPU

A benchmark is a module with ``run(*, quick: bool) -> dict`` and ``to_markdown(result) -> str``. The
dict holds whatever the benchmark measures plus ``checks``: name -> bool for the correctness checks it
made before timing. To add one, write the module and list it in ``BENCHMARKS``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from pathlib import Path

import torch

from benchmarks import common
from benchmarks.common import environment

BENCHMARKS = {
    "attention": "benchmarks.attention",
    "features": "benchmarks.features",
    "memory": "benchmarks.memory",
    "storage": "benchmarks.storage",
    "training": "benchmarks.training",
    "threads": "benchmarks.threads",
    "serve": "benchmarks.serve",
    "generation": "benchmarks.generation",
    "masks": "benchmarks.masks",
}
RESULTS = Path(__file__).resolve().parent / "results"


def run_one(name: str, *, quick: bool, out_dir: Path) -> dict:
    """Run benchmark ``name``, write ``out_dir/name.json`` and return the result."""
    module = importlib.import_module(BENCHMARKS[name])
    start = time.perf_counter()
    env = environment()
    result = module.run(quick=quick)
    result = {"name": name, "quick": quick, "seconds": time.perf_counter() - start, "environment": env,
              "load_average_after": environment()["load_average"], **result}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes: checks the suite runs, in seconds")
    parser.add_argument("--only", action="append", choices=sorted(BENCHMARKS), metavar="NAME",
                        help=f"run only this benchmark (repeatable): {', '.join(BENCHMARKS)}")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    parser.add_argument("--device", default="cpu", help="where to run: cpu, cuda, cuda:N (attention only)")
    parser.add_argument("--out", type=Path, default=None,
                        help="where the JSON goes (default: benchmarks/results, or results/quick with --quick)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    common.DEVICE = torch.device(args.device)
    if common.DEVICE.type != "cpu" and set(args.only or BENCHMARKS) != {"attention"}:
        parser.error("--device other than cpu: only the attention benchmark runs there (--only attention)")
    out_dir = args.out or (RESULTS / "quick" if args.quick else RESULTS)
    failed = []
    for name in args.only or list(BENCHMARKS):
        result = run_one(name, quick=args.quick, out_dir=out_dir)
        module = importlib.import_module(BENCHMARKS[name])
        env = result["environment"]
        print(f"## {name}{' (quick)' if args.quick else ''}\n")
        where = env.get("gpu", f"{env['threads']} threads, {env['cpu']}")
        print(f"torch {env['torch']}, {where}, load average "
              f"{env['load_average'][0]:.1f} -> {result['load_average_after'][0]:.1f}, {result['seconds']:.0f} s\n")
        print(module.to_markdown(result) + "\n")
        failed += [f"{name}: {check}" for check, ok in result["checks"].items() if not ok]
    if failed:
        print("FAILED checks:\n" + "\n".join(failed), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
