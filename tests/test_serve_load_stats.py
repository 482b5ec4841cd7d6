"""benchmarks/serve_load.py's statistics: the paired bootstrap of the p99 ratio and the summary rows."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.serve_load import markdown, paired_p99_ratio, summary


def _rounds(seed: int, n: int = 12, size: int = 150) -> list[list[float]]:
    rng = np.random.default_rng(seed)  # rounds of different speed: a slow stretch of the machine
    return [list(rng.gamma(2.0, 5.0, size) * (1.0 + 3.0 * (i % 5 == 0))) for i in range(n)]


def test_ratio_of_pooled_p99_and_scaling():
    base = _rounds(0)
    got = paired_p99_ratio(base, [[1.3 * t for t in r] for r in base], resamples=200)
    assert got["ratio"] == pytest.approx(1.3, rel=1e-12)
    assert got["ci95"] == pytest.approx([1.3, 1.3], rel=1e-12) and got["rounds"] == 12
    pooled = np.percentile(np.concatenate(_rounds(1)), 99) / np.percentile(np.concatenate(base), 99)
    assert paired_p99_ratio(base, _rounds(1), resamples=50)["ratio"] == pytest.approx(pooled, rel=1e-12)


def test_resampling_keeps_rounds_paired():
    base = _rounds(2)
    same = paired_p99_ratio(base, [list(r) for r in base], resamples=300)
    assert same["ci95"] == pytest.approx([1.0, 1.0])  # unpaired draws of these rounds would spread widely
    other = paired_p99_ratio(base, _rounds(3), resamples=300, seed=1)
    lo, hi = other["ci95"]
    assert lo < other["ratio"] < hi and hi - lo > 0.01


def test_bad_and_degenerate_rounds():
    with pytest.raises(ValueError, match="same positive number of rounds"):
        paired_p99_ratio([[1.0]], [[1.0], [2.0]])
    one = paired_p99_ratio([[1.0, 2.0]], [[2.0, 4.0]])
    assert one["ratio"] == pytest.approx(2.0) and one["ci95"] is None
    assert np.isnan(paired_p99_ratio([[], []], [[1.0], [1.0]])["ratio"])


def test_summary_says_whether_the_whole_interval_meets_the_target():
    def res(ep, c, p99, rps, ci=None):
        r = {"endpoint": ep, "concurrency": c, "p99_ms": p99, "throughput_rps": rps}
        if ci is not None:
            r["p99_vs_predict"] = {"ratio": None, "ci95": ci}
        return r

    rows = summary([res("predict", 1, 10.0, 50.0), res("explain", 1, 11.0, 48.0, [1.02, 1.12]),
                    res("predict", 32, 100.0, 300.0), res("explain", 32, 110.0, 290.0, [0.95, 1.25])])
    by = {r["what"]: r for r in rows}
    assert by["explain p99 / predict p99, concurrency 1"]["met_robustly"] is True
    c32 = by["explain p99 / predict p99, concurrency 32"]
    assert c32["met"] is True and c32["met_robustly"] is False and c32["ci95"] == [0.95, 1.25]
    assert by["predict throughput, concurrency 32 / 1"]["value"] == pytest.approx(6.0)
    doc = {"machine": {"cpu_model": "cpu", "cpu_count": 2, "gpu": None, "torch": "t", "ray": "r", "date_utc": "d"},
           "config": {"model": "m", "device": "cpu", "max_batch": 32, "batch_wait_ms": 5, "requests": 10,
                      "time_limit": 1, "rounds": 2}, "server": {}, "loadavg_before": [0.0], "loadavg_after": [0.0],
           "results": [], "summary": rows}
    assert "| explain p99 / predict p99, concurrency 32 | 1.10 | 0.95 - 1.25 | <= 1.15 | yes | **no** |" in markdown(doc)
