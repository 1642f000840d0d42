"""Benchmark scripts: run each as ``python benchmarks/<name>.py [--write]`` (see docs/benchmarks.md)."""
