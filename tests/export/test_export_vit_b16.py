"""A ViT-B/16-shaped explainer (random weights, built offline) exports with a dynamic batch (traced at 2,
run at 1 and 3)."""

from __future__ import annotations

import time
from collections import Counter

import onnx
import pytest
import torch

from vdm_engine import Explainer, GateConfig, Gates
from vdm_engine.backbone import random_backbone
from vdm_engine.export import export_onnx
from vdm_engine.runtime import OnnxExplainer


@pytest.mark.slow
def test_vit_b16_shape_exports_one_pass_and_runs_at_batch_1_and_3(tmp_path, close):
    backbone = random_backbone("vit-b16", seed=0)
    torch.manual_seed(0)
    gates = Gates(GateConfig(backbone.hidden_size, backbone.num_hidden_states))
    with torch.no_grad():
        gates.add.copy_(torch.linspace(-2.0, 3.0, gates.add.numel()))
    explainer = Explainer(backbone, gates.eval()).eval()
    t0 = time.perf_counter()
    # validate=False keeps this test short: the checker still runs, and parity is checked below at
    # batch 1 (traced at 2); `vdm-export --model vit-b16 --random-weights` runs the full validation.
    result = export_onnx(explainer, tmp_path / "b16.onnx", outputs=("logits", "patch_mask"), validate=False,
                         untrained_gates=True, random_weights=True)
    elapsed = time.perf_counter() - t0
    assert elapsed < 240, f"ViT-B/16 export took {elapsed:.0f} s"
    assert result.input == ("pixel_values", ["batch", 3, 224, 224], "float32")
    assert result.outputs == {"logits": ["batch", 1000], "patch_mask": ["batch", 196]}
    ops = Counter(n.op_type for n in onnx.load(str(result.path), load_external_data=False).graph.node)
    assert ops["Softmax"] == 12, ops  # one attention softmax per encoder layer: one ViT pass
    rt = OnnxExplainer(result.path, providers="cpu")
    assert rt.metadata.untrained_gates and rt.metadata.random_weights and "benchmarks only" in rt.metadata.extra["warning"]
    x = torch.randn(1, 3, 224, 224)
    got, ref = rt.explain(x), explainer.explain(x)
    close(got.logits, ref.logits, 1e-4, 0.0, "ViT-B/16 logits")
    close(got.patch_mask, ref.patch_mask, 1e-4, 0.0, "ViT-B/16 patch_mask")
    ex3 = rt.explain(torch.randn(3, 3, 224, 224))  # a third batch size (prime), beside the traced 2 and the 1 above
    assert ex3.logits.shape == (3, 1000) and ex3.patch_mask.shape == (3, 196) and ex3.grid == (14, 14)
    assert torch.isfinite(ex3.logits).all() and ((ex3.patch_mask >= 0) & (ex3.patch_mask <= 1)).all()
