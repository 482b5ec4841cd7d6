"""The paths around the explainer on non-ViT families: ONNX export with validation, the serving backend,
the CLIs in-process (vdm-explain on a CLIP checkpoint with labels restored from its gates)."""

from __future__ import annotations

import collections

import numpy as np
import pytest
import torch

from family_models import LABELS, load

from vdm_engine import Explainer, GateConfig, Gates


def _gates(backbone):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        g = Gates(GateConfig(backbone.hidden_size, backbone.num_hidden_states, add_init=2.0))
        with torch.no_grad():
            g.w1.normal_(0, 1.0)
    return g


@pytest.fixture(scope="module")
def clip_gates(family_dirs, tmp_path_factory):
    """(CLIP backbone, gates dir saved for it: the labels and prompt travel with the gates)."""
    bb = load("clip", family_dirs["clip"])
    d = tmp_path_factory.mktemp("clip-gates")
    _gates(bb).save_pretrained(d, backbone=bb)
    return bb, d


def test_export_registers_family_validates_with_one_softmax_per_layer(family_dirs, tmp_path, close):
    """DINOv2 with registers (extra prefix tokens, interpolated positions): the validated graph holds
    one encoder pass (L softmaxes) and equals the PyTorch explainer at another batch size (<= 1e-4)."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    import onnx

    from vdm_engine.export import export_onnx
    from vdm_engine.runtime import OnnxExplainer

    bb = load("dinov2_with_registers", family_dirs["dinov2_with_registers"])
    ex = Explainer(bb, _gates(bb)).eval()
    path = tmp_path / "regs.onnx"
    result = export_onnx(ex, path)  # validates: checker, then onnxruntime against PyTorch per output
    assert max(result.max_diffs.values()) <= 1e-4, result.max_diffs
    assert result.metadata.extra.get("model_type") == "dinov2_with_registers"
    ops = collections.Counter(n.op_type for n in onnx.load(str(path)).graph.node)
    assert ops["Softmax"] == bb.num_layers, ops["Softmax"]
    x = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    got, want = OnnxExplainer(path).explain(x), ex.explain(x)
    close(got.logits, want.logits, 1e-4, 1e-4, "onnx logits")
    close(got.patch_mask, want.patch_mask, 1e-4, 1e-4, "onnx patch_mask")
    close(got.layer_masks, want.layer_masks, 1e-4, 1e-4, "onnx layer_masks")


def test_serve_backend_on_a_clip_checkpoint(family_dirs, clip_gates, close):
    """The serving backend (in-process, no Ray) loads CLIP with the labels recorded in the gates; a
    batch equals the explainer and verify runs the masked pass."""
    from vdm_engine.serve import ServeConfig
    from vdm_engine.serve.backend import ServingModel

    bb, gates_dir = clip_gates
    model = ServingModel(ServeConfig(model=str(family_dirs["clip"]), gates=str(gates_dir)))
    assert model.id2label == dict(enumerate(LABELS))
    rng = np.random.default_rng(0)
    x = model.preprocess([rng.integers(0, 256, (40, 48, 3), dtype=np.uint8) for _ in range(3)])
    out = model.explain_batch(x, [True, False, True])
    ref = Explainer(bb, Gates.from_pretrained(gates_dir)).explain(x)
    close(out["logits"], ref.logits, 1e-5, 1e-5, "serve logits")
    close(out["patch_mask"], ref.patch_mask, 1e-5, 1e-5, "serve patch_mask")
    assert torch.isfinite(out["kl"][[0, 2]]).all() and torch.isnan(out["kl"][1])


def test_vdm_explain_cli_on_clip(family_dirs, clip_gates, tmp_path, capsys):
    """vdm-explain --model CLIP_DIR --gates DIR: the labels come from the gates; one result per image."""
    from PIL import Image

    from vdm_engine.cli.explain import main

    _, gates_dir = clip_gates
    img = tmp_path / "a.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(img)
    rc = main([str(img), "--model", str(family_dirs["clip"]), "--gates", str(gates_dir), "--out", str(tmp_path / "o")])
    assert rc == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert any(label in out for label in LABELS), out


@pytest.mark.parametrize("kind", ["deit", "beit"])
def test_triton_kernels_serve_families_without_a_cls_slot_or_positions(kind, family_dirs, close):
    """The patch-mask and probe kernels take the family's slot token and (N+1, D) positions: DeiT
    (the slot is the distillation token) and BEiT (no absolute positions: zeros) equal the references.
    CUDA when present, else the Triton interpreter on the CPU."""
    pytest.importorskip("triton")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    bb = load(kind, family_dirs[kind]).to(device)
    g = _gates(bb).to(device)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4)).to(device)
    ref, tri = Explainer(bb, g, kernels="reference").eval(), Explainer(bb, g, kernels="triton").eval()
    assert tri.ops.backend == "triton"
    with torch.no_grad():
        thr = float(ref.explain(x).patch_mask.median())
        a = ref.run(x, ("logits", "patch_mask", "masked_logits"), threshold=thr)
        b = tri.run(x, ("logits", "patch_mask", "masked_logits"), threshold=thr)
    for k in a:
        close(b[k], a[k], 1e-5, 1e-5, f"{kind} {k}")
