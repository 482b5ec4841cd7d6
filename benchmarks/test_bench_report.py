"""The report script on hand-made pytest-benchmark JSON (no timing)."""

from __future__ import annotations

import json

import pytest

from benchmarks import report

_CONFIG = {"model": "m", "batch": 8, "device": "cpu", "device_name": "CPU X", "dtype": "fp32"}


def _bench(case: str, median: float, minimum: float | None = None, **extra) -> dict:
    return {
        "name": f"test_{case}",
        "group": "g",
        "stats": {"median": median, "min": minimum if minimum is not None else median, "rounds": 5},
        "extra_info": {"case": case, **_CONFIG, **extra},
    }


def _write(tmp_path, name: str, benches: list[dict]):
    path = tmp_path / name
    path.write_text(json.dumps({"machine_info": {"vdm": {"cpu_model": "CPU X", "cpu_count": 2, "torch": "2.x"}},
                                "benchmarks": benches}))
    return path


def test_ratios_are_throughput_ratios(tmp_path):
    path = _write(tmp_path, "r.json", [
        _bench("plain/torch", 0.100), _bench("explain/torch-reference", 0.105), _bench("original/two-pass", 0.210),
        _bench("baseline/gradcam", 0.200), _bench("baseline/ig50", 12.6), _bench("kernel/x", 0.001),
    ])
    _, configs = report.load_results(path)
    (results,) = configs.values()
    assert results["plain/torch"].images_per_s == pytest.approx(80.0)
    rows = {label: (value, target) for label, value, target in report.ratio_rows(results)}
    assert rows["explain / plain, PyTorch (reference kernels)"] == (pytest.approx(0.100 / 0.105), 0.93)
    assert rows["engine (reference) / original two-pass method"] == (pytest.approx(2.0), 1.9)
    assert rows["engine (reference) / Integrated Gradients (50 steps)"][0] == pytest.approx(120.0)
    assert rows["explain / plain, onnxruntime"] == (None, 0.93)  # missing cases give no ratio
    text = report.render({}, configs)
    assert "| explain / plain, PyTorch (reference kernels) | 0.95 |  | >= 0.93 | yes |" in text
    assert "| engine (reference) / Grad-CAM | 1.90 |  | >= 3 | **no** |" in text
    assert "kernel/x" in text and "| explain: engine, Triton kernels | PyTorch | not run |" in text


def test_min_stat_and_best_of_runs(tmp_path):
    a = _write(tmp_path, "a.json", [_bench("plain/torch", 0.100, 0.080), _bench("explain/torch-reference", 0.200, 0.090)])
    b = _write(tmp_path, "b.json", [_bench("plain/torch", 0.120, 0.090), _bench("explain/torch-reference", 0.110, 0.100)])
    runs = [report.load_results(p, "min")[1] for p in (a, b)]
    (results,) = report.merge(runs).values()
    assert results["plain/torch"].min_s == pytest.approx(0.080) and results["plain/torch"].runs == 2
    assert results["explain/torch-reference"].min_s == pytest.approx(0.090)
    assert "best of 2 runs" in report.render({}, report.merge(runs), stat="min")


def test_cli_writes_markdown_and_rejects_bad_input(tmp_path, capsys):
    path = _write(tmp_path, "r.json", [_bench("plain/torch", 0.1), _bench("explain/onnxruntime", 0.1)])
    out = tmp_path / "table.md"
    assert report.main([str(path), "--out", str(out), "--title", "T"]) == 0
    assert out.read_text().startswith("## T")
    assert report.main([str(tmp_path / "missing.json")]) == 2
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"benchmarks": [{"name": "x", "stats": {"median": 1}, "extra_info": {}}]}))
    assert report.main([str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("benchmarks.report: error:") for line in err)


def test_paired_ratios_are_medians_over_rounds(tmp_path):
    paired = _bench("paired/round", 1.0, paired_times={
        "plain/torch": [1.0, 2.0, 1.0], "explain/torch-reference": [1.1, 2.0, 1.05],
        "original/two-pass": [2.0, 4.4, 2.1],
    })
    path = _write(tmp_path, "p.json", [_bench("plain/torch", 0.1), _bench("explain/torch-reference", 0.2), paired])
    _, configs = report.load_results(path)
    (results,) = configs.values()
    assert report.paired_ratio(results, "explain/torch-reference", "plain/torch") == pytest.approx(1 / 1.05)
    assert report.paired_ratio(results, "explain/torch-reference", "original/two-pass") == pytest.approx(2.0)
    text = report.render({}, configs)
    # The paired value decides "met" when it exists (0.50 separately, 0.95 paired).
    assert "| explain / plain, PyTorch (reference kernels) | 0.50 | 0.95 | >= 0.93 | yes |" in text
    assert "paired/round" not in text.split("Other cases")[-1] or "Other cases" not in text


def test_latency_table_puts_plain_and_explain_side_by_side(tmp_path):
    def lat(mode, runtime, b, p50, peak=None):
        extra = {"p50_ms": p50, "p90_ms": p50 * 1.1, "p99_ms": p50 * 1.5}
        if peak is not None:
            extra["peak_call_bytes"] = peak
        bench = _bench(f"latency/{mode}/{runtime}/b{b}", p50 / 1e3, **extra)
        bench["extra_info"]["batch"] = b
        return bench

    path = _write(tmp_path, "l.json", [
        lat("plain", "torch-eager", 1, 2.0, 2**20), lat("explain", "torch-eager", 1, 2.5, 2**21),
        lat("plain", "onnxruntime-int8", 64, 40.0), lat("explain", "onnxruntime-int8", 64, 44.0),
        _bench("plain/torch", 0.1),
    ])
    _, configs = report.load_results(path)
    assert len(configs) == 2  # the latency cases of every batch share one table; plain/torch keeps its own
    latency = next(r for k, r in configs.items() if k[1] == "latency")
    rows = report.latency_rows(latency)
    assert [(r["runtime"], r["batch"]) for r in rows] == [("onnxruntime-int8", 64), ("torch-eager", 1)]
    text = report.render({}, configs)
    assert "| torch-eager | 1 | 2.00 | 2.20 | 3.00 | 2.50 | 2.75 | 3.75 | 1.25 | 1.25 | 1.0 | 2.0 | 2.00 |" in text
    assert "| onnxruntime-int8 | 64 | 40.00 | 44.00 | 60.00 | 44.00 | 48.40 | 66.00 | 1.10 | 1.10 |  |  |  |" in text


def test_levels_paired_table(tmp_path):
    """``test_levels_paired``'s best rounds become one table (wall, CPU and FLOPs ratios, the 1.15x target);
    the case is not listed again among the micro-benchmarks."""
    cases = ("plain/torch", "explain/torch-reference", "explain/torch-levels4-p16", "explain/torch-levels4")
    path = _write(tmp_path, "r.json", [_bench(
        "paired/levels", 0.5, best_wall_ms=dict(zip(cases, (10.0, 10.8, 10.9, 13.5))),
        ratio_wall=dict(zip(cases, (1.0, 1.08, 1.09, 1.35))), ratio_cpu=dict(zip(cases, (1.0, 1.079, 1.091, 1.349))),
        flop_ratio=dict(zip(cases, (1.0, 1.054, 1.057, 1.228))), rounds_timed=99)])
    _, configs = report.load_results(path)
    text = report.render({}, configs)
    assert "each of 99 rounds" in text
    assert "| explain with K=4 levels (patch_rank), probe width D/16 | 10.90 | 1.090 | 1.091 | 1.057 | yes |" in text
    assert "| explain with K=4 levels (patch_rank), probe width D/4 | 13.50 | 1.350 | 1.349 | 1.228 | **no** |" in text
    assert "| plain inference (HF ViT, SDPA) | 10.00 | 1.000 | 1.000 | 1.000 |  |" in text
    assert "| explain: engine, reference kernels | 10.80 | 1.080 | 1.079 | 1.054 |  |" in text  # not a K-level case
    assert "| paired/levels |" not in text
    (results,) = configs.values()
    assert report.levels_paired_table({"plain/torch": results.get("plain/torch")}) == []
