"""The serve load test, sized down and run once: ``vdm-serve`` started on loopback, driven at two
concurrencies on both endpoints, stopped with Ctrl-C (SIGINT). It runs Ray Serve's Python proxy
ingress (``--ingress proxy``): the serve tests' session instance runs the default, HAProxy. The full
measurement is ``python -m benchmarks.serve_load`` on a quiet machine (see its docstring)."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("ray", reason="the serve extra is not installed: pip install 'vdm-engine[serve]'")
pytest.importorskip("aiohttp")


@pytest.mark.slow
@pytest.mark.benchmark(group="serve")
def test_serve_load_sized_down(benchmark, tmp_path):
    from benchmarks import serve_load

    argv = ["--requests", "8", "--rounds", "2", "--concurrency", "1,4", "--time-limit", "20", "--warmup", "1",
            "--max-batch", "8", "--ingress", "proxy", "--out", str(tmp_path)]
    doc = benchmark.pedantic(serve_load.main, args=(argv,), rounds=1, iterations=1)
    assert [(r["endpoint"], r["concurrency"]) for r in doc["results"]] == [
        ("predict", 1), ("predict", 4), ("explain", 1), ("explain", 4)]
    for r in doc["results"]:
        assert r["ok"] + r["errors"] == r["sent"] and r["errors"] == 0, r
        assert r["sent"] <= 8 and r["mean_batch_size"] >= 1.0 and r["rounds"] == 2
    assert doc["config"]["ingress"] == "proxy"
    assert doc["server_exit_code"] == 130  # Ctrl-C: clean shutdown through run_cli
    assert json.loads((tmp_path / "serve_load.json").read_text())["results"] == doc["results"]
    assert "| explain | 4 |" in (tmp_path / "serve_load.md").read_text()
    assert (tmp_path / "serve_load.png").stat().st_size > 0
    benchmark.extra_info.update(case="serve/load-sized-down", results=doc["results"], summary=doc["summary"])
