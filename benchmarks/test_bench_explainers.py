"""Other explainers on the same model and batch: attention rollout, Grad-CAM, Chefer et al., Integrated Gradients."""

from __future__ import annotations

import pytest
import torch

from vdm_engine import attribution

IG_STEPS = 50
IG_MEMORY_BYTES = 1.5 * 2**30  # activations kept for one of captum's internal forward/backward batches


def ig_internal_batch(backbone, batch: int, n_steps: int = IG_STEPS) -> int:
    """Images per forward/backward inside captum: all ``batch * n_steps`` if they fit ~1.5 GiB of activations."""
    T, D, L = backbone.num_tokens, backbone.hidden_size, backbone.num_layers
    heads = int(backbone.config.num_attention_heads)
    bytes_per_image = 4 * L * T * (16 * D + 2 * heads * T)  # rough fp32 activations saved per block
    fit = int(IG_MEMORY_BYTES // bytes_per_image)
    return max(batch, min(batch * n_steps, fit))


def _method(name: str, explainer, batch: int):
    options = {}
    if name == "ig":
        pytest.importorskip("captum", reason="Integrated Gradients needs captum (pip install captum)")
        options = {"n_steps": IG_STEPS, "internal_batch_size": ig_internal_batch(explainer.backbone, batch)}
    return attribution.get_method(name, explainer, **options)


@pytest.mark.benchmark(group="explainers")
@pytest.mark.parametrize("name", ["rollout", "gradcam", "chefer"])
def test_baseline(name, measure, bench_config, bench_explainer, bench_pixels):
    method = _method(name, bench_explainer, bench_config.batch)
    scores = measure(f"baseline/{name}", method, bench_pixels)
    assert scores.shape == (bench_config.batch, bench_explainer.backbone.num_patches)
    assert torch.isfinite(scores).all()


@pytest.mark.benchmark(group="explainers")
def test_baseline_integrated_gradients(benchmark, measure, bench_config, bench_explainer, bench_pixels):
    method = _method("ig", bench_explainer, bench_config.batch)
    # Untimed runs (plain pytest) check the body on two images: 50 steps of a full batch is the
    # slowest body of the suite.
    pixels = bench_pixels if benchmark.enabled else bench_pixels[:2]
    # Warm up on one image: a full call can take minutes on a CPU with ViT-B/16.
    scores = measure(f"baseline/ig{IG_STEPS}", method, pixels, warmup=(pixels[:1],))
    assert scores.shape == (pixels.shape[0], bench_explainer.backbone.num_patches)
    assert torch.isfinite(scores).all()
