"""mmfuse benchmarks: ``python -m benchmarks.run [--quick] [--only NAME]`` from the repository root."""
