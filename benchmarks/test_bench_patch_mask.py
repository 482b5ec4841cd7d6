"""Patch masking of K masks per image: the PyTorch reference vs the Triton kernel (CUDA only).

Geometry, batch, device and dtype come from the session options (``--vdm-model vit-b16 --vdm-batch
64 --vdm-device cuda --vdm-dtype bf16`` gives the ViT-B/16 case). Records achieved GB/s.
"""

from __future__ import annotations

import pytest
import torch

from vdm_engine.backbone import patch_mask_reference
from vdm_engine.kernels import mask_patches


def _inputs(backbone, cfg, K: int):
    g = torch.Generator().manual_seed(0)
    B, N, D = cfg.batch, backbone.num_patches, backbone.hidden_size
    x = torch.randn(B, N, D, generator=g).to(cfg.device, cfg.dtype)
    gates = torch.rand(B, K, N, generator=g).to(cfg.device)
    placeholder = torch.randn(D, generator=g).to(cfg.device)  # gates' parameters stay fp32
    return x, gates, placeholder, backbone.cls_token.detach(), backbone.pos_embed.detach()


def _bytes_moved(x, gates, out) -> int:
    return x.numel() * x.element_size() + gates.numel() * gates.element_size() + out.numel() * out.element_size()


def _provider(name: str, cfg):
    if name == "reference":
        return patch_mask_reference
    if not cfg.cuda:
        pytest.skip("the Triton kernel is timed on CUDA only (the CPU interpreter is not a performance model)")
    return mask_patches


@pytest.mark.benchmark(group="kernel-patch-mask")
@pytest.mark.parametrize("K", [1, 8])
@pytest.mark.parametrize("provider", ["reference", "triton"])
def test_patch_mask_forward(provider, K, measure, benchmark, bench_config, bench_backbone):
    fn = _provider(provider, bench_config)
    args = _inputs(bench_backbone, bench_config, K)
    with torch.no_grad():
        out = measure(f"kernel/patch_mask-{provider}-K{K}", fn, *args)
        expected = patch_mask_reference(*args)
    atol, rtol = bench_config.tolerance
    torch.testing.assert_close(out.float(), expected.float(), atol=atol, rtol=rtol)
    if benchmark.enabled:
        benchmark.extra_info["GB_per_s"] = _bytes_moved(args[0], args[1], out) / benchmark.stats.stats.median / 1e9


@pytest.mark.benchmark(group="kernel-patch-mask")
@pytest.mark.parametrize("provider", ["reference", "triton"])
def test_patch_mask_forward_backward(provider, measure, bench_config, bench_backbone):
    """The training step's share: K=8 masks, gradients for the gates and the placeholder."""
    fn = _provider(provider, bench_config)
    x, gates, ph, cls, pos = _inputs(bench_backbone, bench_config, 8)
    gates.requires_grad_(True)
    ph.requires_grad_(True)
    grad_out = torch.randn(gates.shape[0] * 8, x.shape[1] + 1, x.shape[2], device=x.device, dtype=x.dtype)

    def step():
        return torch.autograd.grad(fn(x, gates, ph, cls, pos), (gates, ph), grad_out)

    got = measure(f"kernel/patch_mask-fwd-bwd-{provider}-K8", step)
    ref = torch.autograd.grad(patch_mask_reference(x.float(), gates, ph, cls.float(), pos.float()), (gates, ph),
                              grad_out.float())
    atol, rtol = bench_config.tolerance
    for a, e in zip(got, ref):
        scale = max(1.0, float(e.abs().max()))
        torch.testing.assert_close(a.float(), e.float(), atol=atol * scale, rtol=rtol)
