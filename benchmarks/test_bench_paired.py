"""Paired timing: the cases behind the headline ratios, called back to back in every round.

On a shared machine the load changes between one case's rounds and the next case's, which moves
ratios of separately timed cases. Here each round calls every variant once on the same batch, so
each per-round ratio sees the same load; the report shows the median per-round ratio beside the
ratio of the separate cases. The timed unit is one whole round.

A case can also slow down the one called after it (on a 2-core machine the case after the
onnxruntime cases ran several times slower than alone), so the order changes every round
(``round_order``): each case follows every other case equally often, and none always follows the
same one.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Sequence, TypeVar

import pytest
import torch

from benchmarks.original_method import OriginalTwoPass
from vdm_engine.attribution import get_method

T = TypeVar("T")


def round_order(cases: Sequence[T], r: int) -> list[T]:
    """The order of ``cases`` in round ``r``: a balanced (Williams) Latin square, one row per round.

    Row ``i`` is the base order 0, 1, n-1, 2, n-2, ... shifted by ``i`` (mod n); for an odd n the
    next n rows are those rows reversed. In each block of n rounds every case sits at every position
    once, and over the period (n rounds for an even n, 2n for an odd n) every case directly follows
    every other case equally often, so no case always follows the same one. (A plain rotation keeps
    each case after the same neighbour in n-1 rounds of n.)
    """
    n = len(cases)
    if n < 2:
        return list(cases)
    base = [0] + [(j + 1) // 2 if j % 2 else n - j // 2 for j in range(1, n)]
    row = [cases[(b + r) % n] for b in base]
    return row[::-1] if n % 2 and (r // n) % 2 else row


def _optional(request, name):
    """A fixture's value, or None when it skips (ONNX export or runtime unavailable)."""
    try:
        return request.getfixturevalue(name)
    except pytest.skip.Exception:
        return None


def _variants(request, cfg, explainer, pixels) -> dict:
    backbone = explainer.backbone
    vit = backbone.model_type == "vit"  # the original two-pass method hooks ViTForImageClassification only
    original = OriginalTwoPass(explainer.backbone, explainer.gates, seed=0) if vit else None

    def plain(pv):
        with torch.no_grad():
            return backbone.hf_forward(pv)

    variants = {
        "plain/torch": (plain, pixels),
        "explain/torch-reference": (explainer.explain, pixels),
        **({"original/two-pass": (original.get_mask, pixels)} if vit else {}),
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
    kernels("reference")
    variants = _variants(request, bench_config, bench_explainer, bench_pixels)
    times: dict[str, list[float]] = {case: [] for case in variants}
    rounds_run = 0

    def one_round():
        nonlocal rounds_run
        for case in round_order(list(variants), rounds_run):
            fn, arg = variants[case]
            start = time.perf_counter()
            fn(arg)
            if bench_config.cuda:
                torch.cuda.synchronize()
            times[case].append(time.perf_counter() - start)
        rounds_run += 1

    # More rounds than a single case: the ratios are medians over rounds.
    measure("paired/round", one_round, budget_s=4 * bench_config.budget_s, min_rounds=3)
    # Drop the warm-up round when there were timed rounds after it.
    n = len(next(iter(times.values())))
    keep = slice(1, None) if n > 1 else slice(None)
    benchmark.extra_info["paired_times"] = {case: t[keep] for case, t in times.items()}
    assert all(len(t) == n and all(s > 0 for s in t) for t in times.values())


@pytest.mark.parametrize("n", range(1, 9))
def test_round_order_is_balanced(n):
    cases = [f"case{i}" for i in range(n)]
    period = n if n % 2 == 0 else 2 * n
    rounds = [round_order(cases, r) for r in range(2 * period)]
    assert all(sorted(order) == cases for order in rounds), "every case once per round"
    assert rounds[:period] == rounds[period:], "the orders repeat with the period"
    for k in range(0, period, n):  # in each block of n rounds every case sits at every position once
        for pos in range(n):
            assert sorted(order[pos] for order in rounds[k:k + n]) == cases
    if n < 2:
        return
    follows = Counter((a, b) for order in rounds[:period] for a, b in zip(order, order[1:]))
    assert set(follows) == {(a, b) for a in cases for b in cases if a != b}, "every case follows every other"
    assert len(set(follows.values())) == 1, f"some case follows another more often: {follows}"
    for case in cases:  # so no case has the same predecessor in every round
        predecessors = {order[order.index(case) - 1] if order.index(case) else None for order in rounds[:period]}
        assert len(predecessors) > 1, (case, predecessors)
