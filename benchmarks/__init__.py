"""Throughput benchmarks (pytest-benchmark) and the report script: ``python -m benchmarks.report RESULTS.json``."""
