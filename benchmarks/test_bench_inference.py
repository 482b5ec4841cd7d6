"""Plain inference, the denominator of explain / plain: the Hugging Face model (SDPA) and onnxruntime."""

from __future__ import annotations

import pytest
import torch


def _plain_torch(backbone):
    def run(pixel_values):
        with torch.no_grad():
            return backbone.hf_forward(pixel_values)  # the family's own transformers forward

    return run


@pytest.mark.benchmark(group="inference")
def test_plain_torch(measure, bench_backbone, bench_pixels):
    model = bench_backbone.model
    assert model.config._attn_implementation == "sdpa", "plain inference must time the SDPA attention"
    logits = measure("plain/torch", _plain_torch(bench_backbone), bench_pixels)
    assert logits.shape == (bench_pixels.shape[0], bench_backbone.num_labels)
    assert torch.isfinite(logits).all()


@pytest.mark.benchmark(group="inference")
def test_plain_onnxruntime(measure, bench_config, bench_backbone, bench_pixels, plain_onnx_session):
    session, input_name = plain_onnx_session
    feed = {input_name: bench_pixels.detach().float().cpu().numpy()}
    (logits,) = measure("plain/onnxruntime", session.run, ["logits"], feed)
    assert logits.shape == (bench_pixels.shape[0], bench_backbone.num_labels)
    with torch.no_grad():
        expected = bench_backbone(bench_pixels).float().cpu()
    atol, rtol = bench_config.tolerance
    torch.testing.assert_close(torch.from_numpy(logits).float(), expected, atol=max(atol, 1e-3), rtol=max(rtol, 1e-3))
