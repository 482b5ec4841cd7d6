"""Baseline attributions on the tiny random ViT: shapes, finiteness, batch consistency, maths."""

from __future__ import annotations

import pytest
import torch

from vdm_engine.attribution import METHODS, available_methods, get_method
from vdm_engine.attribution._attention import traced_forward
from vdm_engine.backbone import random_backbone


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


BASELINES = ["random", "rollout", "gradcam", "chefer", "ig"]


def _method(name, explainer):
    if name == "ig":
        pytest.importorskip("captum")
        return get_method("ig", explainer, n_steps=8)
    return get_method(name, explainer)


def test_traced_forward_reproduces_backbone_logits(tiny_backbone, pixels, close):
    trace = traced_forward(tiny_backbone, pixels)
    close(trace.logits, tiny_backbone(pixels), 1e-5, 1e-5, "traced logits")
    B, T, L = pixels.shape[0], tiny_backbone.num_tokens, tiny_backbone.num_layers
    H = tiny_backbone.config.num_attention_heads
    assert len(trace.attentions) == L and len(trace.attention_inputs) == L
    for a in trace.attentions:
        assert a.shape == (B, H, T, T)
        close(a.sum(-1), torch.ones(B, H, T), 1e-5, 1e-5, "attention rows sum to 1")


def test_traced_forward_odd_geometry_and_gradients(close):
    # 5 heads of size 8 (D=40, not a power of two), 3x3 grid (T=10), 3 layers.
    bb = random_backbone("vit-tiny", seed=3, hidden_size=40, num_attention_heads=5, intermediate_size=56,
                         image_size=24, num_hidden_layers=3, num_labels=7)
    pv = torch.randn(3, 3, 24, 24, requires_grad=True)
    trace = traced_forward(bb, pv)
    close(trace.logits, bb(pv), 1e-5, 1e-5, "traced logits")
    # Gradients through the explicit path equal those through the HF layers.
    (g_traced,) = torch.autograd.grad(trace.logits[:, 2].sum(), pv)
    (g_ref,) = torch.autograd.grad(bb(pv)[:, 2].sum(), pv)
    close(g_traced, g_ref, 1e-5, 1e-4, "input gradients")


@pytest.mark.parametrize("name", BASELINES + ["diffmask"])
def test_method_shapes_finite_and_batch_consistent(name, tiny_explainer, pixels, close):
    method = _method(name, tiny_explainer)
    scores = method(pixels)
    assert scores.shape == (5, tiny_explainer.backbone.num_patches)
    assert scores.dtype == torch.float32
    assert torch.isfinite(scores).all()
    one_by_one = torch.cat([method(pixels[i : i + 1]) for i in range(pixels.shape[0])])
    close(scores, one_by_one, 1e-5, 1e-4, f"{name}: batch vs one by one")
    # Not a constant: the scores depend on the image.
    assert not torch.allclose(scores[0], scores[1])


@pytest.mark.parametrize("name", ["gradcam", "chefer", "ig"])
def test_gradient_methods_depend_on_target(name, tiny_explainer, pixels):
    method = _method(name, tiny_explainer)
    a = method(pixels, torch.zeros(5, dtype=torch.long))
    b = method(pixels, torch.full((5,), 3))
    assert not torch.allclose(a, b)
    predicted = tiny_explainer.backbone(pixels).argmax(-1)
    torch.testing.assert_close(method(pixels), method(pixels, predicted))


def test_rollout_matches_per_image_reference(tiny_backbone, pixels, close):
    """Discarding happens per image: compare with a loop written from the paper's description."""
    ratio = 0.5
    scores = get_method("rollout", backbone=tiny_backbone, discard_ratio=ratio)(pixels)
    trace = traced_forward(tiny_backbone, pixels)
    T = tiny_backbone.num_tokens
    for b in range(pixels.shape[0]):
        R = torch.eye(T)
        for att in trace.attentions:
            A = att[b].mean(0).clone()
            flat = A.flatten()
            order = flat.argsort()
            for i in order[: int(T * T * ratio)].tolist():
                if i != 0:
                    flat[i] = 0.0
            A = flat.view(T, T) + torch.eye(T)
            A = A / A.sum(-1, keepdim=True)
            R = A @ R
        close(scores[b], R[0, 1:], 1e-5, 1e-5, f"rollout image {b}")


def test_chefer_one_layer_by_hand(close):
    """With one block, R = I + mean_h ReLU(dA * A), so the score is that row's CLS -> patch entries."""
    bb = random_backbone("vit-tiny", seed=1, num_hidden_layers=1)
    pv = torch.randn(2, 3, 32, 32)
    trace = traced_forward(bb, pv, requires_grad=True)
    target = trace.logits.argmax(-1)
    (g,) = torch.autograd.grad(trace.logits.gather(1, target[:, None]).sum(), trace.attentions)
    expected = (g * trace.attentions[0]).clamp(min=0).mean(1)[:, 0, 1:]
    close(get_method("chefer", backbone=bb)(pv), expected.detach(), 1e-5, 1e-5, "chefer")


def test_ig_completeness(tiny_backbone, pixels):
    """Integrated Gradients sums to f(x) - f(baseline) (up to the Riemann error)."""
    pytest.importorskip("captum")
    method = get_method("ig", backbone=tiny_backbone, n_steps=64, baseline="zeros")
    target = tiny_backbone(pixels).argmax(-1)
    total = method(pixels, target).sum(-1)
    with torch.no_grad():
        diff = (tiny_backbone(pixels) - tiny_backbone(torch.zeros_like(pixels))).gather(1, target[:, None]).squeeze(1)
    torch.testing.assert_close(total, diff, atol=2e-3, rtol=2e-2)


def test_random_is_reproducible_and_seeded(tiny_backbone, pixels):
    a = get_method("random", backbone=tiny_backbone, seed=1)(pixels)
    assert torch.equal(a, get_method("random", backbone=tiny_backbone, seed=1)(pixels))
    assert not torch.equal(a, get_method("random", backbone=tiny_backbone, seed=2)(pixels))


def test_registry_errors(tiny_backbone, pixels):
    assert set(available_methods()) <= set(METHODS)
    with pytest.raises(ValueError, match="unknown attribution method"):
        get_method("lime", backbone=tiny_backbone)
    with pytest.raises(ValueError, match="needs an Explainer"):
        get_method("diffmask", backbone=tiny_backbone)
    with pytest.raises(ValueError, match="explainer or a backbone"):
        get_method("rollout")
    with pytest.raises(ValueError, match="one class per image"):
        get_method("gradcam", backbone=tiny_backbone)(pixels, torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="pixel_values"):
        get_method("chefer", backbone=tiny_backbone)(pixels[:, :2])
    with pytest.raises(ValueError, match="discard_ratio"):
        get_method("rollout", backbone=tiny_backbone, discard_ratio=1.0)
