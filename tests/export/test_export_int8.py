"""int8 graphs (``--quantize int8``): quantization, the check against fp32, metadata, the CLI's errors."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from vdm_engine.export.quantize import (
    Int8Report,
    QuantizationError,
    check_int8,
    compare_int8,
    export_int8,
    kept_iou,
    quantize_onnx,
)
from vdm_engine.export.validate import graph_inputs, structured_images
from vdm_engine.metadata import read_metadata
from vdm_engine.runtime import OnnxExplainer


def test_kept_iou_hand_worked():
    a = np.array([[1, 1, 0, 0], [0, 0, 0, 0], [1, 0, 1, 0]], bool)
    b = np.array([[1, 0, 0, 0], [0, 0, 0, 0], [0, 1, 0, 1]], bool)
    np.testing.assert_allclose(kept_iou(a, b), [0.5, 1.0, 0.0])  # 1/2; both empty; disjoint


@pytest.mark.parametrize("agreement, iou, ok", [(0.99, 0.95, True), (0.989, 0.99, False), (1.0, 0.949, False),
                                                (0.995, None, True)])
def test_thresholds(agreement, iou, ok):
    report = Int8Report("dynamic", 300, agreement, iou)
    assert report.passed is ok
    if ok:
        assert check_int8(report) is report
    else:
        with pytest.raises(QuantizationError, match=r"not faithful enough: int8 dynamic: prediction agreement"):
            check_int8(report)


@pytest.fixture(scope="module")
def held_out(export_explainer):
    images = structured_images(24, export_explainer.backbone.image_size, seed=3)
    return graph_inputs(export_explainer, images, uint8_input=False)[0].numpy()


@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
def test_int8_graph_keeps_metadata_and_explains(static, full_export, held_out, tmp_path):
    out = tmp_path / "int8.onnx"
    calibration = held_out[:8] if static else None
    method = quantize_onnx(full_export.path, out, calibration=calibration)
    assert method == ("static" if static else "dynamic")
    model = onnx.load(str(out))
    ops = {n.op_type for n in model.graph.node}
    assert ({"QuantizeLinear", "DequantizeLinear"} <= ops) if static else ("DynamicQuantizeLinear" in ops)
    assert read_metadata(out).gates_sha256 == full_export.metadata.gates_sha256  # provenance carried over
    int8 = OnnxExplainer(out, "cpu")
    ex = int8.explain(held_out[:5])
    assert ex.patch_mask.shape == (5, 16) and np.isfinite(ex.patch_mask.numpy()).all()
    # Compared with itself the fp32 graph agrees exactly; the int8 graph is compared honestly.
    same = compare_int8(full_export.path, full_export.path, held_out, method=method)
    assert same.agreement == 1.0 and same.mean_iou == 1.0
    report = compare_int8(full_export.path, out, held_out, method=method)
    assert 0.0 <= report.agreement <= 1.0 and 0.0 <= report.mean_iou <= 1.0 and report.images == 24


def test_export_int8_records_figures_and_refuses_below_threshold(full_export, held_out, tmp_path, monkeypatch):
    out = tmp_path / "int8.onnx"
    report = export_int8(full_export.path, out, held_out, min_agreement=0.0, min_iou=0.0)
    props = {p.key: p.value for p in onnx.load(str(out), load_external_data=False).metadata_props}
    assert props["vdm.extra.quantization"] == "int8-dynamic"
    assert float(props["vdm.extra.int8_agreement"]) == pytest.approx(report.agreement, abs=1e-6)
    assert read_metadata(out).extra["int8_images"] == "24"
    with pytest.raises(ValueError, match="min_iou must be in"):
        export_int8(full_export.path, tmp_path / "bad.onnx", held_out, min_iou=1.5)
    # A comparison below the bar fails with the figures and leaves nothing behind.
    from vdm_engine.export import quantize

    monkeypatch.setattr(quantize, "compare_int8", lambda *a, **k: Int8Report("dynamic", 24, 0.9, 0.5))
    with pytest.raises(QuantizationError, match=r"agreement 0.9000 \(min 0.99\), kept-set IoU 0.5000 \(min 0.95\)"):
        export_int8(full_export.path, tmp_path / "refused.onnx", held_out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["int8.onnx"]


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory, export_explainer):
    root = tmp_path_factory.mktemp("int8_model")
    export_explainer.backbone.save_pretrained(root / "model")
    export_explainer.gates.save_pretrained(root / "gates", backbone=export_explainer.backbone)
    return ["--model", str(root / "model"), "--gates", str(root / "gates")]


def test_cli_int8_errors_exit_2_in_one_line(capsys, tmp_path, model_dirs, monkeypatch, full_export):
    import dataclasses
    import shutil

    import vdm_engine.export.main as export_main
    from vdm_engine.cli.export import main
    from vdm_engine.export import quantize

    out = tmp_path / "q.onnx"
    base = model_dirs + ["--out", str(out)]
    for extra, msg in [
        (["--calibration-data", "digits"], "--calibration-data needs --quantize int8"),
        (["--quantize", "int8", "--fp16"], "--quantize int8 starts from the fp32 graph; drop --fp16"),
        (["--quantize", "int8", "--min-iou", "1.5"], "--min-iou must be in [0, 1], got 1.5"),
        (["--quantize", "int8", "--held-out-images", "0"], "--held-out-images must be >= 1"),
        (["--quantize", "int8", "--calibration-data", "mnist"], "unknown data source 'mnist'"),
        (["--quantize", "int4"], "invalid choice: 'int4'"),
    ]:
        assert main(base + extra) == 2, extra
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and msg in err[0], (extra, err)
    # A graph below the bar: exit 2, the figures in one line, nothing at --out. The fp32 export is
    # the session's graph of the same model (its own tests cover exporting); quantization is real.
    def exported(explainer, path, **kw):
        shutil.copy(full_export.path, path)
        return dataclasses.replace(full_export, path=path)

    monkeypatch.setattr(export_main, "export_onnx", exported)
    monkeypatch.setattr(quantize, "compare_int8", lambda *a, **k: Int8Report("static", 30, 0.5, 0.25, calibration="toy"))
    code = main(base + ["--quantize", "int8", "--calibration-data", "toy", "--calibration-images", "4",
                        "--held-out-images", "30"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "the int8 graph is not faithful enough: int8 static, calibrated on toy" in err[-1], err
    assert sorted(p.name for p in tmp_path.iterdir()) == []
