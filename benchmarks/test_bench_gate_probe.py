"""The L+2 gate probes, one launch per depth as the explain path runs them: PyTorch reference vs Triton.

Hidden states come from the session backbone (``--vdm-model``, ``--vdm-batch``, ``--vdm-dtype``);
the Triton cases run on CUDA only. Records achieved GB/s (hidden states read + log keep written).
"""

from __future__ import annotations

import pytest
import torch

from vdm_engine import GateConfig, Gates
from vdm_engine.gates import gate_probe_reference, probe_depths
from vdm_engine.kernels import probe_gates


@pytest.fixture(scope="module")
def probe_inputs(bench_config, bench_backbone, bench_pixels):
    """(hidden states (L+2, B, T, D) in the session dtype, fp32 probe params) on the session device."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        gates = Gates(GateConfig(bench_backbone.hidden_size, bench_backbone.num_hidden_states)).eval()
        with torch.no_grad():
            gates.add.copy_(torch.linspace(-1.0, 3.0, gates.add.numel()))
    gates.to(bench_config.device)
    with torch.no_grad():
        _, hidden = bench_backbone.hidden_states(bench_pixels)
    return hidden, gates.probe_params()


@pytest.mark.benchmark(group="kernel-gate-probe")
@pytest.mark.parametrize("provider", ["reference", "triton"])
def test_gate_probe(provider, measure, benchmark, bench_config, probe_inputs):
    hidden, probes = probe_inputs
    if provider == "triton" and not bench_config.cuda:
        pytest.skip("the Triton kernel is timed on CUDA only (the CPU interpreter is not a performance model)")
    fn = probe_gates if provider == "triton" else gate_probe_reference
    with torch.no_grad():
        got = measure(f"kernel/gate_probe-log_keep-{provider}", probe_depths, fn, hidden, probes)
        expected = probe_depths(gate_probe_reference, hidden, probes)
    atol, rtol = bench_config.tolerance
    torch.testing.assert_close(got.float(), expected.float(), atol=atol, rtol=rtol)
    if benchmark.enabled:
        moved = hidden.numel() * hidden.element_size() + got.numel() * got.element_size()
        benchmark.extra_info["GB_per_s"] = moved / benchmark.stats.stats.median / 1e9
