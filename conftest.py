"""Repository-wide pytest setup: plain ``pytest`` runs each benchmark body once, untimed, on vit-tiny,
and runs the whole suite on two worker processes.

pytest-benchmark times every benchmark unless told otherwise, which would make the test command
slow. Unless ``--benchmark-only`` or ``--benchmark-enable`` is given, benchmarks are disabled: each
body still runs once (so it cannot rot) but nothing is calibrated or repeated. Those untimed runs
use the ``vit-tiny`` shape unless ``--vdm-model`` is given: the timed default, ``vit-small``, only
matters for the ratios and takes half a minute more to export and run.

The whole suite (``pytest`` with no paths) runs on ``WORKERS`` pytest-xdist workers when xdist is
installed (the ``dev`` extra): a test module never splits over two workers (its module fixtures run
once), and every test that uses Ray (``RAY_TESTS``) runs on one worker, which then holds the one
shared Ray instance (``pytest_xdist_make_scheduler``). A selection of paths, ``-n``/``--dist``,
``--pdb``, ``--collect-only`` or timed benchmarks run in one process as before.
"""

from __future__ import annotations

import os

import pytest

#: Worker processes for the whole suite (at most one per CPU).
WORKERS = 2
#: Tests that start or join Ray: one xdist group, so one worker runs them all on one shared instance.
RAY_TESTS = ("tests/serve/", "benchmarks/test_bench_serve.py", "benchmarks/test_bench_bulk.py")


@pytest.hookimpl(tryfirst=True)
def pytest_cmdline_main(config):
    # Runs before pytest-xdist's own, which turns numprocesses into workers.
    opt = config.option
    if hasattr(config, "workerinput") or os.environ.get("PYTEST_XDIST_WORKER"):
        return None  # a worker runs its tests itself
    if not hasattr(opt, "numprocesses") or not _whole_suite(config):
        return None
    if any(a.startswith(("-n", "--numprocesses", "--dist", "-d")) for a in _args(config)):
        return None  # the user chose
    if getattr(opt, "usepdb", False) or getattr(opt, "collectonly", False) or _timed(opt):
        return None
    workers = min(WORKERS, os.cpu_count() or 1)
    if workers > 1:
        opt.numprocesses, opt.dist = workers, "loadscope"
        # One intra-op thread per worker (and the processes they start) unless set: two workers
        # of two spinning OpenMP threads each would share the two cores of the CI machine.
        os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // workers)))
    return None


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    # Runs before pytest-benchmark's own (trylast) pytest_configure reads the options.
    opt = config.option
    if not hasattr(opt, "benchmark_disable"):  # pytest-benchmark not installed or disabled with -p no:
        return
    timed = _timed(opt)
    if not timed and not getattr(opt, "benchmark_skip", False):
        opt.benchmark_disable = True
    if not timed and hasattr(opt, "vdm_model") and not _given(config, "--vdm-model"):
        opt.vdm_model = "vit-tiny"


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """Whole modules as units of work, and every Ray test in one unit (xdist's own ``xdist_group``
    suffixes node ids in a way pytest 9.2 no longer honours)."""
    from xdist.scheduler import LoadScopeScheduling

    class ModulesAndRay(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return work_unit(nodeid)

    return ModulesAndRay(config, log)


def work_unit(nodeid: str) -> str:
    """The unit of work a test belongs to on the workers: ``ray`` for ``RAY_TESTS``, else its module."""
    path = nodeid.split("::", 1)[0]
    return "ray" if path.startswith(RAY_TESTS) else path


def _timed(opt) -> bool:
    return bool(getattr(opt, "benchmark_only", False) or getattr(opt, "benchmark_enable", False))


def _whole_suite(config) -> bool:
    """``pytest`` named no paths: it runs ``testpaths``."""
    return config.args_source == pytest.Config.ArgsSource.TESTPATHS


def _args(config) -> list[str]:
    return [*config.invocation_params.args, *os.environ.get("PYTEST_ADDOPTS", "").split()]


def _given(config, option: str) -> bool:
    """Whether ``option`` is on the command line or in ``PYTEST_ADDOPTS``."""
    return any(a == option or a.startswith(option + "=") for a in _args(config))

