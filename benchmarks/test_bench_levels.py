"""Explain with K-level gates (``levels=4``: the one-pass ranking, ``patch_rank``) beside plain inference.

The issue's bar: explain with K = 4 levels within 1.15x plain inference. Both cases run in the
``inference`` group, so the report reads them against ``plain/torch``. Each case also records the
load-independent cost, ``flop_ratio``: FLOPs of one explain call over one plain forward, counted by
``torch.utils.flop_counter`` (matmuls and attention). Probe width D/4 (the default) costs about
4.6% of a ViT-B/16 forward per level; D/8 (the width the vit-digits recipe study checked) half that.
"""

from __future__ import annotations

import pytest
import torch

PROBE_DIVISORS = {"": 4, "-p8": 8}  # case suffix -> probe width D // divisor


def flop_ratio(explainer, pixels: torch.Tensor) -> float:
    """FLOPs of ``explainer.explain(pixels)`` over those of the plain forward ``backbone(pixels)``."""
    from torch.utils.flop_counter import FlopCounterMode

    counts = []
    with torch.no_grad():
        for fn in (explainer.backbone, explainer.explain):
            mode = FlopCounterMode(display=False)
            with mode:
                fn(pixels)
            counts.append(mode.get_total_flops())
    return counts[1] / counts[0]


@pytest.fixture(scope="module", params=list(PROBE_DIVISORS), ids=lambda s: f"probe-d{PROBE_DIVISORS[s]}")
def levels_explainer(request, bench_config, bench_backbone):
    from vdm_engine import Explainer, GateConfig, Gates

    from .conftest import use_kernels

    D = bench_backbone.hidden_size
    levels = []
    for s in range(1, 5):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(s)
            g = Gates(GateConfig(D, bench_backbone.num_hidden_states, probe_size=max(1, D // PROBE_DIVISORS[request.param])))
            with torch.no_grad():
                g.placeholder.normal_()
                g.add.copy_(torch.linspace(-1.0, 3.0, g.add.numel()))
        levels.append(g)
    ex = Explainer(bench_backbone, Gates.stack(levels).to(bench_config.device).eval()).eval()
    use_kernels(ex, "reference")
    return request.param, ex


@pytest.mark.benchmark(group="inference")
def test_explain_levels4(benchmark, measure, bench_config, levels_explainer, bench_pixels):
    suffix, ex = levels_explainer
    if benchmark.enabled:  # timed runs only: plain pytest runs the body once, as cheaply as it can
        benchmark.extra_info["flop_ratio"] = round(flop_ratio(ex, bench_pixels[:1]), 4)
    benchmark.extra_info["probe_size"] = ex.gates.config.probe_size
    exp = measure(f"explain/torch-levels4{suffix}", ex.explain, bench_pixels)
    B, N = bench_config.batch, ex.backbone.num_patches
    assert exp.patch_rank.shape == (B, N) and torch.isfinite(exp.patch_rank).all()
    assert float(exp.patch_rank.min()) >= 0 and float(exp.patch_rank.max()) <= 5
