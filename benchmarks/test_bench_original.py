"""The original Vision-DiffMask method: forward hooks and two full eager ViT passes per explanation."""

from __future__ import annotations

import pytest
import torch

from benchmarks.original_method import OriginalTwoPass


@pytest.mark.benchmark(group="inference")
def test_original_two_pass(measure, bench_config, bench_explainer, bench_pixels):
    if bench_explainer.backbone.model_type != "vit":
        pytest.skip(f"the original method hooks ViTForImageClassification; --vdm-model is a "
                    f"{bench_explainer.backbone.model_type!r} checkpoint")
    original = OriginalTwoPass(bench_explainer.backbone, bench_explainer.gates, seed=0)
    result = measure("original/two-pass", original.get_mask, bench_pixels)
    bb, B = bench_explainer.backbone, bench_config.batch
    assert result.mask.shape == result.gates.shape == (B, bb.num_patches)
    assert result.logits.shape == result.masked_logits.shape == (B, bb.num_labels)
    assert torch.isfinite(result.kl).all() and (result.kl > -1e-4).all()
    # Same probes, same numbers: the two-pass method's mask is the engine's, and its masked pass is
    # the backbone's masked forward under the gates it sampled.
    atol, rtol = bench_config.tolerance
    expected = bench_explainer.explain(bench_pixels)
    torch.testing.assert_close(result.mask, expected.patch_mask, atol=atol, rtol=rtol)
    torch.testing.assert_close(result.logits, expected.logits, atol=atol, rtol=rtol)
    with torch.no_grad():
        masked = bb.masked_logits(bench_pixels, result.gates, bench_explainer.gates.placeholder).float()
    torch.testing.assert_close(result.masked_logits, masked, atol=atol, rtol=rtol)
    assert not torch.allclose(result.gates, torch.ones_like(result.gates)), "the setter pass masked nothing"
