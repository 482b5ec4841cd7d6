"""The fused K-level probe (``gate_probe_levels_reference``, ``Gates.fused_probes``) against the plain
per-level probe (``gate_probe_reference``), and its use in ``Explainer.probe_pass(levels=True)``."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from vdm_engine import Explainer, GateConfig, Gates
from vdm_engine.gates import (FusedProbes, finish_probes, fuse_levels, gate_probe_levels_reference, gate_probe_reference,
                              project_depth)

from tests.conftest import make_tiny_levels


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def _levels(D: int, S: int, K: int, P: int, seed: int = 0) -> list[Gates]:
    """K random single-level gates whose keep probabilities spread from ~0 to ~1."""
    torch.manual_seed(seed)
    out = []
    for k in range(K):
        g = Gates(GateConfig(D, S, probe_size=P))
        with torch.no_grad():
            g.w1.mul_(3.0)
            g.add.copy_(torch.linspace(-2.0, 4.0, S) - k)
        out.append(g)
    return out


def _per_level(h0, hs, gates: Gates, depth: int) -> torch.Tensor:
    """The plain reference: each level's probe on its own, stacked -> (B, K, T)."""
    return torch.stack([gate_probe_reference(h0, hs, p, depth) for p in gates.level_params()], 1)


# (D, S, K, P, B, T): a hidden size that is not a power of two, one-patch and 197-token shapes, prime batches, K = 1.
SHAPES = [(36, 4, 3, 9, 3, 17), (100, 3, 4, 25, 2, 2), (192, 8, 4, 12, 5, 50), (64, 3, 1, 16, 7, 197)]


@pytest.mark.parametrize("dtype, atol, rtol", [(torch.float32, 1e-5, 1e-5), (torch.bfloat16, 1e-2, 1e-2)], ids=str)
@pytest.mark.parametrize("D, S, K, P, B, T", SHAPES)
def test_fused_equals_per_level(D, S, K, P, B, T, dtype, atol, rtol, close):
    levels = _levels(D, S, K, P)
    gates = (Gates.stack(levels) if K > 1 else levels[0]).to(dtype)
    hs = torch.randn(S, B, T, D).to(dtype)
    fused = gates.fused_probes()
    assert fused.w1.shape == (S, K * P, 2 * D) and fused.w2_block.shape == (S, K * P, K) and fused.levels == K
    with torch.no_grad():
        expected = torch.stack([_per_level(hs[0], hs[s], gates, s) for s in range(S)], 2)  # (B, K, S, T)
        got = torch.stack([gate_probe_levels_reference(hs[0], hs[s], fused, s) for s in range(S)], 2)
    assert expected.min() < -1.0 and expected.max() > -0.1, "probes too saturated for a meaningful check"
    assert got.shape == (B, K, S, T) and got.dtype == torch.float32
    # bf16: both sides round the same weights and activations; the sums differ only in order
    close(got, expected, atol, rtol, f"fused log_keep {dtype}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("D, S, K, P, B, T", SHAPES)
def test_wide_layout_equals_per_level(D, S, K, P, B, T, dtype, close):
    """``project_depth`` per depth + one ``finish_probes`` equals each level's probe run alone, for
    every level (``wide_probes(levels=True)``) and for the main level (``wide_probes()``).

    fp32: 1e-5. bf16: the two layouts round in a different order and ``mul`` (10) amplifies the
    rounding of the second layer, so neither is within 1e-2 of the other everywhere; both are
    compared with the fp32 maths on the same bf16 weights and inputs, and the wide layout's worst
    error may not exceed the per-level reference's own by more than 1e-2.
    """
    levels = _levels(D, S, K, P, seed=1)
    gates = (Gates.stack(levels, main_level=K - 1) if K > 1 else levels[0]).to(dtype)
    hs = torch.randn(S, B, T, D).to(dtype)
    exact = Gates(gates.config)
    exact.load_state_dict({k: v.float() for k, v in gates.state_dict().items()})
    with torch.no_grad():
        expected = torch.stack([_per_level(hs[0], hs[s], gates, s) for s in range(S)], 2)  # (B, K, S, T)
        truth = torch.stack([_per_level(hs[0].float(), hs[s].float(), exact, s) for s in range(S)], 2)
        for every in (True, False):
            wide = gates.wide_probes(every)
            assert wide.levels == (K if every else 1) and len(wide.w_hs) == S
            got = finish_probes(hs[0], [project_depth(hs[s], wide, s) for s in range(S)], wide)
            want, true = (expected, truth) if every else (expected[:, K - 1 :], truth[:, K - 1 :])
            assert got.shape == want.shape and got.dtype == torch.float32
            if dtype == torch.float32:
                close(got, want, 1e-5, 1e-5, f"wide log_keep levels={every}")
            else:
                own = (want - true).abs().max().item()
                close(got, true, own + 1e-2, 1e-2, f"wide log_keep bf16 levels={every} (reference's own error {own:.3g})")


def test_fused_probes_cached_until_weights_change(close):
    gates = Gates.stack(_levels(36, 4, 3, 9)).eval()
    with torch.no_grad():
        first = gates.fused_probes()
        assert gates.fused_probes() is first, "built once, not per call"
        gates.add.add_(1.0)  # in place (training, load_state_dict): rebuilt
        moved = gates.fused_probes()
        assert moved is not first
        close(moved.bias, first.bias + 1.0, 1e-6, 1e-6, "rebuilt bias")
        gates.load_state_dict({k: v.clone() for k, v in gates.state_dict().items()})
        assert gates.fused_probes() is not moved
        wide = gates.wide_probes(True)
        assert gates.wide_probes(True) is wide and gates.wide_probes() is not wide, "one cache per layout"
        half = gates.to(torch.bfloat16).fused_probes()  # dtype (and device) changes rebuild it
        assert half.w1.dtype == torch.bfloat16 and half.w1.data_ptr() != moved.w1.data_ptr()
        assert gates.wide_probes(True).w_h0.dtype == torch.bfloat16
    # with autograd recording it is built from the parameters, so gradients reach them
    gates = Gates.stack(_levels(36, 4, 2, 9))
    h = torch.randn(2, 5, 36)
    gate_probe_levels_reference(h, h, gates.fused_probes(), 1).sum().backward()
    assert gates.w1.grad is not None and gates.w1.grad.abs().sum() > 0
    assert "fused" not in gates._derived, "nothing cached while recording gradients"


def test_fuse_levels_layout():
    """Level k of depth s is rows kP..(k+1)P-1 of w1[s]; the second layer is block-diagonal."""
    gates = Gates.stack(_levels(36, 4, 3, 9))
    with torch.no_grad():
        f = fuse_levels(gates.level_params())
        for k, p in enumerate(gates.level_params()):
            assert torch.equal(f.w1[2, 9 * k : 9 * (k + 1)], p.w1[2])
            assert torch.equal(f.w2_block[2, 9 * k : 9 * (k + 1), k], p.w2[2])
            assert torch.equal(f.w2[2, 9 * k : 9 * (k + 1)], p.w2[2])
        mask = torch.block_diag(*[torch.ones(9, 1)] * 3).bool()
        assert (f.w2_block[:, ~mask] == 0).all(), "off-diagonal blocks must be zero"


def test_probe_pass_one_fused_call_per_depth(tiny_backbone, pixels, close):
    """levels=True calls the levels op once per depth (not K times) and matches every level run alone."""
    levels = make_tiny_levels(tiny_backbone, 4)
    ex = Explainer(tiny_backbone, Gates.stack(levels, main_level=2), kernels="reference").eval()
    calls = []

    def recording(h0, hs, probes, depth):
        assert isinstance(probes, FusedProbes)
        calls.append(depth)
        return gate_probe_levels_reference(h0, hs, probes, depth)

    ops = dataclasses.replace(ex.ops, gate_probe_levels=recording, probe_layout="per-depth")
    with torch.no_grad():
        logits, _, log_keep = ex.probe_pass(pixels, ops, levels=True)
        S = tiny_backbone.num_hidden_states
        assert calls == list(range(S))
        for k, g in enumerate(levels):
            _, _, alone = Explainer(tiny_backbone, g, kernels="reference").probe_pass(pixels)
            close(log_keep[:, k], alone, 1e-5, 1e-5, f"level {k}")
        _, _, main = ex.probe_pass(pixels)  # the single-level path reads the main level
        close(main, log_keep[:, 2], 1e-5, 1e-5, "main level")
