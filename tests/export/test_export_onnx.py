"""export_onnx: parity with the PyTorch explainer, one encoder pass, dtypes, uint8 input, atomicity."""

from __future__ import annotations

import os
from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from vdm_engine.explainer import Explanation
from vdm_engine.export import ExplainerGraph, ExportValidationError, export_onnx
from vdm_engine.export.validate import structured_images

ALL_OUTPUTS = ("logits", "patch_mask", "layer_masks", "masked_logits", "kl")


def op_counts(path) -> Counter:
    """Op types of the main graph and of any local functions (weights not loaded)."""
    m = onnx.load(str(path), load_external_data=False)
    c = Counter(n.op_type for n in m.graph.node)
    for f in m.functions:
        c.update(n.op_type for n in f.node)
    return c


def run_ort(path, x) -> dict[str, np.ndarray]:
    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in s.get_outputs()]
    return dict(zip(names, s.run(None, {s.get_inputs()[0].name: np.asarray(x)})))


def reference(explainer, pv, patch_mask_for_verify=None) -> dict[str, torch.Tensor]:
    ex = explainer.explain(pv)
    pm = ex.patch_mask if patch_mask_for_verify is None else torch.as_tensor(patch_mask_for_verify)
    v = explainer.verify(pv, Explanation(ex.logits, pm, ex.layer_masks, ex.grid, ex.image_size))
    return {"logits": ex.logits, "patch_mask": ex.patch_mask, "layer_masks": ex.layer_masks,
            "masked_logits": v.masked_logits, "kl": v.kl}


# ----- the module that is exported ------------------------------------------------------------
def test_graph_module_equals_explain_and_verify(tiny_explainer, pixels, close):
    graph = ExplainerGraph(tiny_explainer, ALL_OUTPUTS).eval()
    with torch.no_grad():
        out = dict(zip(graph.outputs, graph(pixels)))
    ref = reference(tiny_explainer, pixels)
    for name in ALL_OUTPUTS:
        close(out[name], ref[name], 1e-6, 1e-5, name)
    assert graph.outputs == ALL_OUTPUTS


def test_graph_uint8_input_folds_the_checkpoint_preprocessing(tiny_explainer, close):
    images = structured_images(3, (32, 32), seed=4)
    graph = ExplainerGraph(tiny_explainer, uint8_input=True)
    pv = graph.pixel_values(torch.from_numpy(images))
    close(pv, tiny_explainer.preprocess(images), 1e-6, 1e-6, "pixel_values from uint8")


def test_outputs_are_checked_and_ordered(tiny_explainer):
    assert ExplainerGraph(tiny_explainer, ("patch_mask", "logits")).outputs == ("logits", "patch_mask")
    with pytest.raises(ValueError, match="unknown output"):
        ExplainerGraph(tiny_explainer, ("logits", "saliency"))
    with pytest.raises(ValueError, match="no outputs"):
        ExplainerGraph(tiny_explainer, ())
    with pytest.raises(ValueError, match="threshold"):
        ExplainerGraph(tiny_explainer, threshold=1.5)


# ----- fp32, every output, dynamic batch ----------------------------------------------------
def test_full_export_reports_small_differences(full_export, export_explainer):
    assert export_explainer.backbone.config._attn_implementation == "sdpa"  # SDPA attention is what gets exported
    assert set(full_export.max_diffs) == set(ALL_OUTPUTS)
    assert all(d <= 1e-4 for d in full_export.max_diffs.values()), full_export.max_diffs
    assert full_export.tolerance == 1e-4
    assert full_export.input == ("pixel_values", ["batch", 3, 32, 32], "float32")
    assert full_export.outputs == {
        "logits": ["batch", 10], "patch_mask": ["batch", 16], "layer_masks": ["batch", 4, 16],
        "masked_logits": ["batch", 10], "kl": ["batch"],
    }
    assert not any(p.name.endswith((".tmp", ".staging")) for p in full_export.path.parent.iterdir())


@pytest.mark.parametrize("batch", [1, 7])
def test_full_export_matches_pytorch_at_other_batch_sizes(full_export, export_explainer, batch, close):
    """Traced at batch 2; the batch axis must really be dynamic."""
    x = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(batch))
    got = run_ort(full_export.path, x.numpy())
    ref = reference(export_explainer, x, got["patch_mask"])
    for name in ALL_OUTPUTS:
        close(torch.from_numpy(got[name]), ref[name], 1e-4, 0.0, f"{name} at batch {batch}")
    # the masked pass used a hard mask that actually drops something for some image
    assert (got["patch_mask"] <= 0.5).any() and (got["patch_mask"] > 0.5).any()


def test_masked_outputs_add_exactly_one_more_encoder_pass(full_export, mask_only_export):
    L = 2
    assert op_counts(mask_only_export.path)["Softmax"] == L
    assert op_counts(full_export.path)["Softmax"] == 2 * L


# ----- mask-only, external data, fast-path hooks ---------------------------------------------
def test_mask_only_export_with_external_data(mask_only_export, export_explainer, close):
    r = mask_only_export
    assert r.metadata.outputs == ("logits", "patch_mask")
    assert [p.name for p in r.data_files] == ["mask.onnx.data"] and r.data_files[0].is_file()
    assert r.size_bytes == os.path.getsize(r.path) + os.path.getsize(r.data_files[0])
    m = onnx.load(str(r.path), load_external_data=False)
    external = [t for t in m.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    inline = [t for t in m.graph.initializer if t.data_location != onnx.TensorProto.EXTERNAL]
    assert len(external) >= 10 and max(len(t.raw_data) for t in inline) < 1024  # the weights live in the .data file
    x = torch.randn(3, 3, 32, 32)
    got = run_ort(r.path, x.numpy())
    ex = export_explainer.explain(x)
    close(torch.from_numpy(got["logits"]), ex.logits, 1e-4, 0.0, "logits")
    close(torch.from_numpy(got["patch_mask"]), ex.patch_mask, 1e-4, 0.0, "patch_mask")


def test_onnx_explainer_on_a_mask_only_graph(mask_only_export, export_explainer, close):
    from vdm_engine.runtime import OnnxExplainer

    x = torch.randn(4, 3, 32, 32)
    got = OnnxExplainer(mask_only_export.path, providers="cpu").explain(x)
    ref = export_explainer.explain(x)
    assert got.layer_masks is None  # the graph has no layer_masks output
    close(got.cpu().patch_mask, ref.patch_mask, 1e-4, 0.0, "patch_mask")
    close(got.logits, ref.logits, 1e-4, 0.0, "logits")


# ----- fp16 ---------------------------------------------------------------------------------
def test_fp16_export_parity(export_explainer, tmp_path, close):
    try:
        r = export_onnx(export_explainer, tmp_path / "h.onnx", dtype="fp16")
    except ExportValidationError as e:
        if "onnxruntime" in str(e) and "differs" not in str(e):
            pytest.skip(f"the CPU execution provider cannot run this fp16 graph: {e}")
        raise
    assert r.tolerance == 1e-2 and all(d <= 1e-2 for d in r.max_diffs.values()), r.max_diffs
    m = onnx.load(str(r.path))
    types = Counter(t.data_type for t in m.graph.initializer if len(t.dims) >= 2)
    assert types[onnx.TensorProto.FLOAT16] > 0 and types[onnx.TensorProto.FLOAT] == 0, types
    assert m.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    x = torch.randn(5, 3, 32, 32)
    got = run_ort(r.path, x.numpy())
    ex = export_explainer.explain(x)
    close(torch.from_numpy(got["logits"]), ex.logits, 1e-2, 0.0, "fp16 logits")
    close(torch.from_numpy(got["patch_mask"]), ex.patch_mask, 1e-2, 0.0, "fp16 patch_mask")
    # fp16 is not fp32: the graph really computes in half precision
    assert np.abs(got["logits"] - ex.logits.numpy()).max() > 1e-6
    assert export_explainer.backbone.dtype == torch.float32, "export must not convert the caller's explainer"


# ----- failures ---------------------------------------------------------------------------------
def test_failed_validation_leaves_no_file(export_explainer, tmp_path, monkeypatch):
    import vdm_engine.export.validate as validate

    real = validate._reference

    def off_by_1e3(*args, **kwargs):
        ref = real(*args, **kwargs)
        ref["logits"] = ref["logits"] + 1e-3
        return ref

    monkeypatch.setattr(validate, "_reference", off_by_1e3)
    target = tmp_path / "model.onnx"
    target.write_bytes(b"previous model")
    with pytest.raises(ExportValidationError, match="'logits' differs from PyTorch by 1.0"):
        export_onnx(export_explainer, target, outputs=("logits",), external_data=True)  # the smallest graph
    # no temp file, no staging folder, no external data; the previous file is untouched
    assert sorted(os.listdir(tmp_path)) == ["model.onnx"] and target.read_bytes() == b"previous model"


def test_bad_arguments_are_value_errors(tiny_explainer, tmp_path):
    p = tmp_path / "m.onnx"
    cases = [
        (dict(opset=12), "opset"), (dict(dtype="bf16"), "dtype"), (dict(batch=0), "batch"),
        (dict(batch="auto"), "batch"), (dict(outputs=("heatmap",)), "unknown output"),
        (dict(atol=-1.0), "atol"),
    ]
    for kwargs, match in cases:
        with pytest.raises(ValueError, match=match):
            export_onnx(tiny_explainer, p, **kwargs)
    with pytest.raises(ValueError, match="directory"):
        export_onnx(tiny_explainer, tmp_path)
    with pytest.raises(ValueError, match="Explainer"):
        export_onnx(tiny_explainer.backbone, p)
    assert not p.exists()
