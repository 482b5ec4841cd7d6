"""Paired timing: the cases behind the headline ratios, called back to back in every round.

On a shared machine the load changes between one case's rounds and the next case's, which moves
ratios of separately timed cases. Here each round calls every variant once on the same batch, so
each per-round ratio sees the same load; the report shows the median per-round ratio beside the
ratio of the separate cases. The timed unit is one whole round.
"""

from __future__ import annotations

import time

import pytest
import torch

from benchmarks.original_method import OriginalTwoPass


def _optional(request, name):
    """A fixture's value, or None when it skips (ONNX export or runtime unavailable)."""
    try:
        return request.getfixturevalue(name)
    except pytest.skip.Exception:
        return None


def _variants(request, cfg, explainer, pixels) -> dict:
    from vdm_engine.attribution import get_method

    model = explainer.backbone.model
    original = OriginalTwoPass(explainer.backbone, explainer.gates, seed=0)

    def plain(pv):
        with torch.no_grad():
            return model(pixel_values=pv).logits

    variants = {
        "plain/torch": (plain, pixels),
        "explain/torch-reference": (explainer.explain, pixels),
        "original/two-pass": (original.get_mask, pixels),
        "baseline/gradcam": (get_method("gradcam", explainer), pixels),
        "baseline/chefer": (get_method("chefer", explainer), pixels),
    }
    session = _optional(request, "plain_onnx_session")
    onnx_explainer = _optional(request, "onnx_explainer")
    if session is not None and onnx_explainer is not None:
        sess, input_name = session
        feed = {input_name: pixels.detach().float().cpu().numpy()}
        variants["plain/onnxruntime"] = (lambda f: sess.run(["logits"], f), feed)
        variants["explain/onnxruntime"] = (onnx_explainer.explain, pixels.float())
    return variants


@pytest.mark.benchmark(group="paired")
def test_paired_round(request, benchmark, measure, kernels, bench_config, bench_explainer, bench_pixels):
    pytest.importorskip("vdm_engine.attribution", reason="vdm_engine.attribution is not available")
    kernels("reference")
    variants = _variants(request, bench_config, bench_explainer, bench_pixels)
    times: dict[str, list[float]] = {case: [] for case in variants}

    def one_round():
        for case, (fn, arg) in variants.items():
            start = time.perf_counter()
            fn(arg)
            if bench_config.cuda:
                torch.cuda.synchronize()
            times[case].append(time.perf_counter() - start)

    # More rounds than a single case: the ratios are medians over rounds.
    measure("paired/round", one_round, budget_s=4 * bench_config.budget_s, min_rounds=3)
    # Drop the warm-up round when there were timed rounds after it.
    n = len(next(iter(times.values())))
    keep = slice(1, None) if n > 1 else slice(None)
    benchmark.extra_info["paired_times"] = {case: t[keep] for case, t in times.items()}
    assert all(len(t) == n and all(s > 0 for s in t) for t in times.values())
