"""The wide probe layout (``Ops.probe_layout == "wide"``, the graph's ``GraphProbes``) against the
per-depth reference, in PyTorch and in ONNX."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vdm_engine import Explainer, Gates
from vdm_engine.export.graph import OUTPUTS, ExplainerGraph
from vdm_engine.export.probes import GraphProbes
from vdm_engine.ops import reference_ops

from tests.conftest import ALL_OUTPUTS, make_tiny_gates


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def _levels(backbone, k):
    """K-level gates whose levels differ in every weight (least sparse first)."""
    out = []
    for i in range(k):
        g = make_tiny_gates(backbone)
        with torch.no_grad():
            g.add.add_(-1.5 * i)
            g.w1.mul_(1 + 0.3 * i)
            g.b1.add_(0.1 * i)
            g.w2.mul_(1 - 0.2 * i)
        out.append(g)
    return Gates.stack(out).eval()


@pytest.mark.parametrize("k", [1, 3])
def test_wide_probe_pass_equals_the_per_depth_reference(shared_tiny_explainer, k, close):
    ex = shared_tiny_explainer if k == 1 else Explainer(shared_tiny_explainer.backbone,
                                                        _levels(shared_tiny_explainer.backbone, k)).eval()
    levels = ex.gates.level_params()
    assert len({p.w1.data_ptr() for p in levels}) == k  # the levels really are different weights
    pv = torch.randn(7, 3, 32, 32)  # prime batch; T = 17 tokens, D = 36
    per_depth, graph = reference_ops(probe_layout="per-depth"), GraphProbes(ex.gates, levels=True)
    with torch.no_grad():
        for levels_too in (True, False):
            logits, h0, want = ex.probe_pass(pv, per_depth, levels=levels_too)  # (B, K, L+2, T) or (B, L+2, T)
            for wide in (None, graph.wide() if levels_too else None):  # the gates' cache, the graph's buffers
                got_logits, got_h0, got = ex.probe_pass(pv, reference_ops(), levels=levels_too, wide=wide)
                assert got.shape == want.shape and got.dtype == torch.float32
                assert want.shape[-2:] == (ex.backbone.num_hidden_states, 17)
                close(got, want, 1e-5, 1e-5, f"log keep, {k} level(s), levels={levels_too}")
                assert torch.equal(got_logits, logits) and torch.equal(got_h0, h0)


def test_graph_module_outputs_equal_explainer_run(shared_tiny_explainer, close):
    """Every output of the fused graph module (the masked pass and the K-level ranking included)
    equals ``Explainer.run`` with the reference ops, fp32 1e-5."""
    pv = torch.randn(5, 3, 32, 32)
    k_level = Explainer(shared_tiny_explainer.backbone, _levels(shared_tiny_explainer.backbone, 2)).eval()
    for ex, outputs in ((shared_tiny_explainer, ALL_OUTPUTS), (k_level, OUTPUTS)):
        graph = ExplainerGraph(ex, outputs).eval()
        assert graph.probes is not None
        with torch.no_grad():
            got = dict(zip(graph.outputs, graph(pv)))
            want = ex.run(pv, outputs, ops=reference_ops())
        for name in outputs:
            close(got[name], want[name], 1e-5, 1e-5, name)


def test_onnx_graph_equals_pytorch_reference_and_has_fewer_nodes(full_export, shared_tiny_explainer, close):
    """The session's exported graph (fused probes, the default) in onnxruntime against the PyTorch
    reference at fp32 1e-5, and its probes as one node set, not one per depth."""
    import onnx

    from vdm_engine.runtime import OnnxExplainer

    pv = torch.randn(3, 3, 32, 32)
    got = OnnxExplainer(full_export.path, "cpu").run(pv)
    with torch.no_grad():
        want = shared_tiny_explainer.run(pv, ALL_OUTPUTS, ops=reference_ops())
    for name in ALL_OUTPUTS:
        close(got[name], want[name], 1e-5, 1e-5, f"onnx {name}")
    nodes = onnx.load(str(full_export.path), load_external_data=False).graph.node
    counts = {op: sum(n.op_type == op for n in nodes) for op in ("Tanh", "Sigmoid", "Log")}
    assert counts == {"Tanh": 2, "Sigmoid": 1, "Log": 1}, counts  # per depth these were L+2 each
    probes = {f"probes.w_hs_{s}" for s in range(shared_tiny_explainer.backbone.num_hidden_states)}
    inits = {t.name for t in onnx.load(str(full_export.path), load_external_data=False).graph.initializer}
    assert probes <= inits and np.all([name in inits for name in ("probes.w_h0", "probes.w2")])
