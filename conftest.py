"""Repository-wide pytest setup: plain ``pytest`` runs each benchmark body once, untimed, on vit-tiny.

pytest-benchmark times every benchmark unless told otherwise, which would make the test command
slow. Unless ``--benchmark-only`` or ``--benchmark-enable`` is given, benchmarks are disabled: each
body still runs once (so it cannot rot) but nothing is calibrated or repeated. Those untimed runs
use the ``vit-tiny`` shape unless ``--vdm-model`` is given: the timed default, ``vit-small``, only
matters for the ratios and takes half a minute more to export and run.
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
    if not timed and hasattr(opt, "vdm_model") and not _given(config, "--vdm-model"):
        opt.vdm_model = "vit-tiny"


def _given(config, option: str) -> bool:
    """Whether ``option`` is on the command line or in ``PYTEST_ADDOPTS``."""
    import os

    args = [*config.invocation_params.args, *os.environ.get("PYTEST_ADDOPTS", "").split()]
    return any(a == option or a.startswith(option + "=") for a in args)
