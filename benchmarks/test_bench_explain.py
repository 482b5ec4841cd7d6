"""Explain a batch: the PyTorch engine (reference kernels, Triton kernels) and the fused ONNX graph."""

from __future__ import annotations

import pytest
import torch


def _check_explanation(exp, backbone, batch):
    assert exp.logits.shape == (batch, backbone.num_labels)
    assert exp.patch_mask.shape == (batch, backbone.num_patches)
    assert exp.layer_masks.shape == (batch, backbone.num_hidden_states, backbone.num_patches)
    assert torch.isfinite(exp.patch_mask).all() and torch.isfinite(exp.logits).all()


@pytest.mark.benchmark(group="inference")
def test_explain_torch_reference(measure, kernels, bench_config, bench_explainer, bench_pixels):
    kernels("reference")
    exp = measure("explain/torch-reference", bench_explainer.explain, bench_pixels)
    _check_explanation(exp, bench_explainer.backbone, bench_config.batch)
    # The explanation's logits are the plain prediction (same forward pass).
    with torch.no_grad():
        plain = bench_explainer.backbone.hf_forward(bench_pixels).float()
    atol, rtol = bench_config.tolerance
    torch.testing.assert_close(exp.logits, plain, atol=atol, rtol=rtol)


@pytest.mark.benchmark(group="inference")
def test_explain_torch_triton(measure, kernels, bench_config, bench_explainer, bench_pixels):
    if not bench_config.cuda:
        pytest.skip("the Triton kernels run on CUDA only; rerun with --vdm-device cuda on a GPU")
    kernels("reference")
    expected = bench_explainer.explain(bench_pixels)
    kernels("triton")
    exp = measure("explain/torch-triton", bench_explainer.explain, bench_pixels)
    _check_explanation(exp, bench_explainer.backbone, bench_config.batch)
    atol, rtol = bench_config.tolerance
    torch.testing.assert_close(exp.patch_mask, expected.patch_mask, atol=atol, rtol=rtol)


@pytest.mark.benchmark(group="inference")
def test_explain_onnxruntime(measure, bench_config, bench_explainer, bench_pixels, onnx_explainer):
    pixels = bench_pixels.float()  # the graph takes float32 pixel values whatever its compute dtype
    exp = measure("explain/onnxruntime", onnx_explainer.explain, pixels)
    _check_explanation(exp, bench_explainer.backbone, bench_config.batch)
    expected = bench_explainer.explain(bench_pixels)
    atol, rtol = bench_config.tolerance
    for name in ("logits", "patch_mask", "layer_masks"):
        torch.testing.assert_close(getattr(exp, name).cpu(), getattr(expected, name).cpu(),
                                   atol=max(atol, 1e-3), rtol=max(rtol, 1e-3), msg=lambda m: f"{name}: {m}")
