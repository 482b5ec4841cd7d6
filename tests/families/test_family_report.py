"""The benchmark report's explain / plain table per model family, on hand-made pytest-benchmark JSON."""

from __future__ import annotations

import json

import pytest


def _bench(case: str, median: float, model: str, family: str | None) -> dict:
    extra = {"case": case, "model": model, "batch": 8, "device": "cpu", "device_name": "CPU X", "dtype": "fp32"}
    if family:
        extra["family"] = family
    return {"name": f"test_{case}", "group": "g", "stats": {"median": median, "min": median, "rounds": 3},
            "extra_info": extra}


def test_report_has_one_explain_plain_row_per_family(tmp_path):
    report = pytest.importorskip("benchmarks.report")
    runs = []
    for name, family, plain, explain in (("deit", "deit", 0.010, 0.0125), ("clip", "clip", 0.020, 0.020)):
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps({"machine_info": {}, "benchmarks": [
            _bench("plain/torch", plain, f"/m/{name}", family), _bench("explain/torch-reference", explain, f"/m/{name}", family),
            _bench("plain/onnxruntime", plain / 2, f"/m/{name}", family),
            _bench("explain/onnxruntime", explain / 2, f"/m/{name}", family)]}))
        runs.append(report.load_results(path)[1])
    text = report.render({}, report.merge(runs))
    assert "### explain / plain per model family" in text
    assert "| deit | /m/deit | 8 | cpu | fp32 | 0.80 |  | 0.80 |" in text  # images/s ratios; Triton not run
    assert "| clip | /m/clip | 8 | cpu | fp32 | 1.00 |  | 1.00 |" in text
    assert report.family_table({}) == []
