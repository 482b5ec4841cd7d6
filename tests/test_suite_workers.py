"""The test command's worker policy (the repository's ``conftest.py``)."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _root_conftest():
    spec = importlib.util.spec_from_file_location("_root_conftest", ROOT / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_ray_tests_form_one_unit_and_modules_stay_whole():
    c = _root_conftest()
    assert c.work_unit("tests/serve/test_bulk.py::test_block_size_rule[None-image_size0-1024]") == "ray"
    assert c.work_unit("tests/serve/test_serve_http.py::test_x") == "ray"
    assert c.work_unit("benchmarks/test_bench_serve.py::test_serve_load_sized_down") == "ray"
    assert c.work_unit("benchmarks/test_bench_bulk.py::test_bulk_digits_vs_explain_loop") == "ray"
    assert c.work_unit("tests/export/test_export_cli.py::test_a[1]") == "tests/export/test_export_cli.py"
    assert c.work_unit("benchmarks/test_bench_explain.py::test_b") == "benchmarks/test_bench_explain.py"


def test_every_module_that_imports_ray_is_in_the_ray_unit():
    """A test module that starts or joins Ray outside the ray unit would start a second instance."""
    c = _root_conftest()
    for path in [*ROOT.glob("tests/**/test_*.py"), *ROOT.glob("benchmarks/test_*.py")]:
        if path.name == Path(__file__).name:
            continue
        text = path.read_text()
        if "import ray" in text or "ray_session" in text or "importorskip(\"ray\"" in text:
            rel = path.relative_to(ROOT).as_posix()
            assert c.work_unit(f"{rel}::t") == "ray", f"{rel} uses Ray but runs outside the ray unit"


def _config(args=(), source="testpaths", worker=False, **options):
    opt = SimpleNamespace(**{"numprocesses": None, "dist": "no", "usepdb": False, "collectonly": False,
                             "benchmark_only": False, "benchmark_enable": False, **options})
    config = SimpleNamespace(option=opt, invocation_params=SimpleNamespace(args=tuple(args)),
                             args_source=getattr(pytest.Config.ArgsSource, source.upper()))
    if worker:
        config.workerinput = {}
    return config


@pytest.mark.parametrize("case, spread", [
    (dict(), True),
    (dict(args=["tests/test_gates.py"], source="args"), False),
    (dict(args=["-n", "0"]), False),
    (dict(args=["-n4"]), False),
    (dict(args=["--dist=load"]), False),
    (dict(benchmark_only=True), False),
    (dict(usepdb=True), False),
    (dict(worker=True), False),
])
def test_only_the_whole_suite_is_spread_over_workers(case, spread, monkeypatch):
    monkeypatch.delenv("PYTEST_XDIST_WORKER", raising=False)
    monkeypatch.delenv("PYTEST_ADDOPTS", raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "")  # recorded, so whatever the hook sets is undone
    monkeypatch.delenv("OMP_NUM_THREADS")
    c = _root_conftest()
    config = _config(**case)
    c.pytest_cmdline_main(config)
    workers = min(c.WORKERS, os.cpu_count() or 1)
    if spread and workers > 1:
        assert (config.option.numprocesses, config.option.dist) == (workers, "loadscope")
        assert os.environ["OMP_NUM_THREADS"] == str(max(1, os.cpu_count() // workers))
    else:
        assert (config.option.numprocesses, config.option.dist) == (None, "no")
        assert "OMP_NUM_THREADS" not in os.environ
