"""Triton gate probe of one depth vs ``gate_probe_reference``, on poisoned outputs (CPU interpreter here).

The reference computes in the probes' dtype (fp32) whatever the hidden states' dtype, so for half
hidden states it is the exact value; the kernel runs its matmuls in the half dtype (weights rounded
to it) with fp32 accumulation.
"""

from __future__ import annotations

import copy
import importlib

import pytest
import torch

from vdm_engine.gates import GateConfig, Gates
from vdm_engine.kernels import gate_probe_reference, probe_gates

gp = importlib.import_module("vdm_engine.kernels.gate_probe")

# On a CUDA machine the kernels run on the card; without one, under the interpreter on the CPU.
DEV = "cuda" if torch.cuda.is_available() else "cpu"

TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (1e-2, 1e-2), torch.bfloat16: (2e-2, 2e-2)}


def _probes(S: int, D: int, seed: int = 1):
    """Random probes whose keep probabilities spread from ~0 to ~1 (not all saturated)."""
    torch.manual_seed(seed)
    gates = Gates(GateConfig(D, S))
    with torch.no_grad():
        gates.w1.mul_(3.0)
        gates.add.copy_(torch.linspace(-2.0, 4.0, S))
    return gates.to(DEV).probe_params()


def _check(S, B, T, D, dtype, close):
    """Every depth (depth 0 with hs = h0 itself) against the reference with the same arguments."""
    probes = _probes(S, D)
    hs = torch.randn(S, B, T, D, device=DEV).to(dtype)
    with torch.no_grad():
        expected = torch.stack([gate_probe_reference(hs[0], hs[s], probes, s) for s in range(S)], 1)
        got = torch.stack([probe_gates(hs[0], hs[0] if s == 0 else hs[s], probes, s) for s in range(S)], 1)
    assert expected.min() < -1.0 and expected.max() > -0.1, "probes too saturated for a meaningful check"
    atol, rtol = TOL[dtype]
    assert got.shape == (B, S, T) and got.dtype == torch.float32
    close(got, expected, atol, rtol, f"log_keep {dtype}")


# (S, B, T, D): T in {17, 50, 197}, D in {100, 192, 768}; P = D // 4 = 25, 48, 192.
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("S,B,T,D", [(4, 3, 17, 100), (3, 2, 50, 192)])
def test_matches_reference(S, B, T, D, dtype, close, poison):
    _check(S, B, T, D, dtype, close)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_matches_reference_vit_b16_tokens(dtype, close, poison):
    _check(3, 1, 197, 768, dtype, close)


def test_gpu_tiling(monkeypatch, close, poison):
    """The GPU blocks (64-token tiles, 32/64-wide D steps and 64-wide P tiles, ragged edges) under the interpreter."""
    sizes = gp._block_sizes
    monkeypatch.setattr(gp, "_block_sizes", lambda R, D, P, interpret, elem: sizes(R, D, P, False, elem))
    assert sizes(100, 300, 75, False, 2)[:3] == (64, 64, 64) and sizes(100, 300, 75, False, 4)[:3] == (64, 32, 64)
    _check(3, 2, 50, 300, torch.float32, close)  # R=100: 2 token tiles; D=300: 10 D steps; P=75: 2 P tiles
    _check(3, 3, 17, 36, torch.float16, close)  # P=9 padded to 16


@pytest.mark.parametrize("block_p, p_tiles", [(16, 2), (16, 3), (32, 3)])
def test_p_tiles_share_hidden_state_loads(block_p, p_tiles, monkeypatch, close, poison):
    """P_TILES P tiles per pass over D (h_s loaded once per pass): ragged P, several passes, padding."""
    monkeypatch.setattr(gp, "_block_sizes", lambda R, D, P, interpret, elem: (32, 16, block_p, p_tiles, 4, 2))
    _check(3, 2, 25, 100, torch.float32, close)  # P=25: 2 tiles of 16 or 1 of 32, the rest of the pass padding
    _check(2, 3, 17, 300, torch.bfloat16, close)  # P=75: 5 tiles of 16 in 3 or 2 passes, or 3 tiles of 32


def test_p_tiles_out_of_range(monkeypatch):
    monkeypatch.setattr(gp, "_block_sizes", lambda R, D, P, interpret, elem: (32, 16, 16, 4, 4, 2))
    with pytest.raises(ValueError, match=r"P_TILES must be 1 to 3, got 4"):
        h = torch.zeros(2, 5, 8, device=DEV)
        probe_gates(h, h, _probes(3, 8), 1)


def test_one_patch_prime_batch(close, poison):
    _check(2, 7, 2, 36, torch.float32, close)


def test_matches_gates_module(tiny_backbone, tiny_gates, pixels, close):
    """Per depth, the same numbers as the stacked Gates method the trainer uses on real hidden states."""
    with torch.no_grad():
        _, hs = tiny_backbone.hidden_states(pixels)
        gates = copy.deepcopy(tiny_gates).to(DEV)
        hs, p = hs.to(DEV), gates.probe_params()
        got = torch.stack([probe_gates(hs[0], hs[s], p, s) for s in range(hs.shape[0])], 1)
        close(got, gates.log_keep_prob(hs), 1e-5, 1e-5, "log_keep")


def test_compiles_without_graph_breaks(close):
    probes = _probes(3, 36)
    hs = torch.randn(3, 2, 17, 36, device=DEV)
    compiled = torch.compile(probe_gates, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        close(compiled(hs[0], hs[2], probes, 2), gate_probe_reference(hs[0], hs[2], probes, 2), 1e-5, 1e-5,
              "compiled log_keep")


@pytest.mark.parametrize(
    "hs_shape, h0_shape, depth, field, value, match",
    [
        ((2, 5, 8), None, 1, None, None, None),
        ((3, 2, 5, 8), None, 1, None, None, r"h0 and hs must both be \(B, T, D\)"),
        ((2, 5, 8), (2, 4, 8), 1, None, None, r"h0 and hs must both be \(B, T, D\)"),
        ((2, 5, 6), None, 1, None, None, r"probes.w1 must be \(S, P, 2D=12\)"),
        ((2, 5, 8), None, 3, None, None, r"depth must be in \[0, 3\) for 3 probes, got 3"),
        ((2, 5, 8), None, -1, None, None, r"depth must be in \[0, 3\)"),
        ((2, 5, 8), None, 1, "b1", torch.zeros(3, 5), r"^probe_gates: probes.b1 must be \(3, 2\)"),
        ((2, 5, 8), None, 1, "add", torch.zeros(2), r"^probe_gates: probes.add must be \(3,\)"),
    ],
)
def test_bad_arguments(hs_shape, h0_shape, depth, field, value, match):
    probes = Gates(GateConfig(8, 3, probe_size=2)).to(DEV).probe_params()
    if field is not None:
        probes = probes._replace(**{field: value.to(DEV)})
    hs = torch.zeros(hs_shape, device=DEV)
    h0 = torch.zeros(h0_shape or hs_shape, device=DEV)
    if match is None:  # the valid baseline of this table
        assert probe_gates(h0, hs, probes, depth).shape == (2, 5)
        return
    with pytest.raises(ValueError, match=match):
        probe_gates(h0, hs, probes, depth)


def test_mixed_dtypes_rejected():
    probes = Gates(GateConfig(8, 3, probe_size=2)).to(DEV).probe_params()
    h = torch.zeros(2, 5, 8, device=DEV)
    with pytest.raises(ValueError, match=r"h0 and hs must share a dtype"):
        probe_gates(h, h.half(), probes, 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_levels_match_fused_reference(dtype, close, poison):
    """K levels in one launch (grid axis 1) equal ``gate_probe_levels_reference``; P = 9 is padded."""
    from vdm_engine.gates import gate_probe_levels_reference
    from vdm_engine.kernels import probe_gates_levels

    S, B, T, D, K = 3, 3, 17, 36, 4
    torch.manual_seed(2)
    levels = []
    for k in range(K):
        g = Gates(GateConfig(D, S, probe_size=9))
        with torch.no_grad():
            g.w1.mul_(3.0)
            g.add.copy_(torch.linspace(-2.0, 4.0, S) - k)
        levels.append(g)
    fused = Gates.stack(levels).to(DEV).fused_probes()
    hs = torch.randn(S, B, T, D, device=DEV).to(dtype)
    with torch.no_grad():
        expected = torch.stack([gate_probe_levels_reference(hs[0], hs[s], fused, s) for s in range(S)], 2)
        got = torch.stack([probe_gates_levels(hs[0], hs[s], fused, s) for s in range(S)], 2)
    assert got.shape == (B, K, S, T) and expected.min() < -1.0 and expected.max() > -0.1
    atol, rtol = TOL[dtype]
    close(got, expected, atol, rtol, f"levels log_keep {dtype}")
    with pytest.raises(ValueError, match=r"probe_gates_levels: probes.bias must be \(3, 4\)"):
        probe_gates_levels(hs[0], hs[1], fused._replace(bias=fused.bias[:, :2]), 1)
