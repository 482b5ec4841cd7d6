"""Repository-wide pytest setup: plain ``pytest`` runs each benchmark body once, untimed.

pytest-benchmark times every benchmark unless told otherwise, which would make the test command
slow. Unless ``--benchmark-only`` or ``--benchmark-enable`` is given, benchmarks are disabled: each
body still runs once (so it cannot rot) but nothing is calibrated or repeated.
"""

from __future__ import annotations

import pytest


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    # Runs before pytest-benchmark's own (trylast) pytest_configure reads the options.
    opt = config.option
    if not hasattr(opt, "benchmark_disable"):  # pytest-benchmark not installed or disabled with -p no:
        return
    timed = getattr(opt, "benchmark_only", False) or getattr(opt, "benchmark_enable", False)
    if not timed and not getattr(opt, "benchmark_skip", False):
        opt.benchmark_disable = True
