"""Explain with K-level gates (``levels=4``: the one-pass ranking, ``patch_rank``) beside plain inference.

The issue's bar: explain with K = 4 levels within 1.15x plain inference. Both cases run in the
``inference`` group, so the report reads them against ``plain/torch``.
"""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def levels_explainer(bench_config, bench_backbone):
    from vdm_engine import Explainer, Gates

    from .conftest import random_gates, use_kernels

    stacked = Gates.stack([random_gates(bench_backbone, seed=s) for s in range(1, 5)]).to(bench_config.device)
    ex = Explainer(bench_backbone, stacked.eval()).eval()
    use_kernels(ex, "reference")
    return ex


@pytest.mark.benchmark(group="inference")
def test_explain_levels4(measure, bench_config, levels_explainer, bench_pixels):
    exp = measure("explain/torch-levels4", levels_explainer.explain, bench_pixels)
    B, N = bench_config.batch, levels_explainer.backbone.num_patches
    assert exp.patch_rank.shape == (B, N) and torch.isfinite(exp.patch_rank).all()
    assert float(exp.patch_rank.min()) >= 0 and float(exp.patch_rank.max()) <= 5
