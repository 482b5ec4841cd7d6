"""``vdm-explain``: overlay PNGs, JSON records, bad files, the ONNX back end's wiring."""

from __future__ import annotations

import json
import sys
import types

import numpy as np
import pytest
from PIL import Image

from vdm_engine import Explainer
from vdm_engine.cli.explain import main
from vdm_engine.records import overlay_caption
from vdm_engine.visualize import overlay, overlay_scale


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def _image(path, h, w, seed, fmt=None):
    arr = np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    Image.fromarray(arr).save(path, format=fmt)
    return arr


def test_explain_writes_overlay_and_json(tmp_path, model_and_gates, capsys):
    model, gates = model_and_gates
    a = _image(tmp_path / "a.png", 40, 48, 0)
    _image(tmp_path / "b.jpg", 32, 32, 1)
    out = tmp_path / "out"
    rc = main([str(tmp_path / "a.png"), str(tmp_path / "b.jpg"), "--model", model, "--gates", gates,
               "--out", str(out), "--top-k", "3"])
    assert rc == 0, capsys.readouterr().err
    rec = json.loads((out / "a.json").read_text())
    assert json.loads((out / "b.json").read_text())["image"].endswith("b.jpg")
    # The record matches the library's explanation of the same image.
    ex = Explainer.from_pretrained(model, gates=gates)
    exp = ex.explain(ex.preprocess(a))
    assert rec["grid"] == [4, 4] and np.array(rec["patch_mask"]).shape == (4, 4)
    np.testing.assert_allclose(np.array(rec["patch_mask"]).ravel(), exp.patch_mask[0].numpy(), atol=1e-6)
    assert rec["label_index"] == int(exp.labels[0]) and rec["label"] == ex.backbone.id2label[rec["label_index"]]
    assert rec["score"] == pytest.approx(float(exp.probs[0].max()), abs=1e-6)
    assert [t["index"] for t in rec["top_k"]] == exp.probs[0].topk(3).indices.tolist()
    assert rec["kept_fraction"] == pytest.approx(float(exp.kept_fraction()[0]))
    assert rec["gates_sha256"] == ex.gates.sha256 and len(rec["model_sha256"]) == 64
    assert rec["image_size"] == [40, 48] and rec["warnings"] == []  # nothing adapted beyond the resize
    # The overlay PNG: what visualize.overlay draws for this image and record (its panel boxes), with
    # the dropped patches grey in the third panel and the kept ones as in the image.
    png = Image.open(out / "a.overlay.png")
    grid = np.array(rec["patch_mask"])
    ref = overlay(a, grid, caption=overlay_caption(model, rec))
    assert png.format == "PNG" and png.size == ref.size
    s = overlay_scale(40, 48)
    x0, y0, x1, y1 = ref.info["panels"]["grey"]
    grey = np.asarray(png.convert("RGB"))[y0:y1, x0:x1].astype(int)
    src = a.repeat(s, 0).repeat(s, 1).astype(int)
    kept = np.kron(grid > 0.5, np.ones((10 * s, 12 * s))).astype(bool)
    assert kept.any() and (~kept).any()
    assert np.array_equal(grey[kept], src[kept]) and (grey[~kept] == 128).all()
    # the mask over depth: one panel per hidden state, named in the record
    assert rec["depth"] == str(out / "a.depth.png") and Image.open(out / "a.depth.png").size[0] >= 256


def test_bad_files_are_reported_and_others_still_processed(tmp_path, model_and_gates, capsys):
    model, gates = model_and_gates
    good = tmp_path / "good.png"
    _image(good, 32, 32, 2)
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"definitely not a PNG")
    bmp = tmp_path / "pic.bmp"
    _image(bmp, 32, 32, 3, fmt="BMP")
    truncated = tmp_path / "cut.jpg"
    _image(tmp_path / "full.jpg", 64, 64, 4)
    truncated.write_bytes((tmp_path / "full.jpg").read_bytes()[:200])
    missing = tmp_path / "missing.png"
    out = tmp_path / "out"
    rc = main([str(p) for p in (garbage, good, bmp, truncated, missing, tmp_path)]
              + ["--model", model, "--gates", gates, "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2
    assert "Traceback" not in err
    for name in ("garbage.png", "pic.bmp", "cut.jpg", "missing.png"):
        assert sum(name in line for line in err.splitlines()) == 1, err
    assert "unsupported image format BMP" in err
    assert "5 of 6 images could not be read" in err
    assert json.loads((out / "good.json").read_text())["image"] == str(good)
    assert (out / "good.overlay.png").is_file()
    assert sorted(p.name for p in out.iterdir()) == ["good.depth.png", "good.json", "good.overlay.png"]


def test_same_stem_gets_distinct_outputs(tmp_path, model_and_gates):
    model, gates = model_and_gates
    (tmp_path / "d").mkdir()
    _image(tmp_path / "x.png", 32, 32, 5)
    _image(tmp_path / "d" / "x.png", 32, 32, 6)
    out = tmp_path / "out"
    assert main([str(tmp_path / "x.png"), str(tmp_path / "d" / "x.png"), "--model", model, "--gates", gates,
                 "--out", str(out), "--batch-size", "1"]) == 0
    assert json.loads((out / "x-2.json").read_text())["image"] == str(tmp_path / "d" / "x.png")


def test_usage_errors(tmp_path, model_and_gates, capsys):
    model, gates = model_and_gates
    _image(tmp_path / "a.png", 32, 32, 7)
    assert main([str(tmp_path / "a.png"), "--model", model, "--gates", gates, "--top-k", "0", "--out",
                 str(tmp_path / "o")]) == 2
    assert "--top-k" in capsys.readouterr().err
    assert main([str(tmp_path / "a.png"), "--model", model, "--gates", str(tmp_path / "nope")]) == 2
    capsys.readouterr()
    assert main([str(tmp_path / "a.png"), "--model", model, "--onnx", "m.onnx"]) == 2  # exclusive options
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not allowed with argument --model" in err


def test_onnx_backend_is_used_lazily(tmp_path, model_and_gates, monkeypatch, capsys):
    """--onnx goes through vdm_engine.runtime.OnnxExplainer (stubbed here by the PyTorch explainer)."""
    model, gates = model_and_gates
    ex = Explainer.from_pretrained(model, gates=gates)
    calls = []

    class FakeOnnxExplainer:
        def __init__(self, path):
            calls.append(path)
            self.metadata = types.SimpleNamespace(gates_sha256="abc123", gates_source="path", untrained_gates=False,
                                                  backbone_mismatch=False)
            self.id2label = {i: f"d{i}" for i in range(10)}

        def preprocess(self, images):
            return ex.preprocess(images)

        def explain(self, pv):
            return ex.explain(pv)

    monkeypatch.setitem(sys.modules, "vdm_engine.runtime", types.SimpleNamespace(OnnxExplainer=FakeOnnxExplainer))
    onnx_path = tmp_path / "m.onnx"
    onnx_path.write_bytes(b"stub graph")
    _image(tmp_path / "a.png", 32, 32, 8)
    out = tmp_path / "out"
    assert main([str(tmp_path / "a.png"), "--onnx", str(onnx_path), "--out", str(out)]) == 0, capsys.readouterr().err
    rec = json.loads((out / "a.json").read_text())
    assert calls == [str(onnx_path)]
    assert rec["gates_sha256"] == "abc123" and rec["label"].startswith("d") and rec["model"] == str(onnx_path)
    assert len(rec["model_sha256"]) == 64
    assert main([str(tmp_path / "a.png"), "--onnx", str(tmp_path / "none.onnx")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_onnx_backend_matches_pytorch(tmp_path, model_and_gates, capsys):
    """A real exported graph through vdm_engine.runtime gives the PyTorch path's record."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    export = pytest.importorskip("vdm_engine.export")
    model, gates = model_and_gates
    ex = Explainer.from_pretrained(model, gates=gates)
    onnx_path = tmp_path / "tiny.onnx"
    export.export_onnx(ex, onnx_path)
    _image(tmp_path / "a.png", 36, 30, 9)
    assert main([str(tmp_path / "a.png"), "--onnx", str(onnx_path), "--out", str(tmp_path / "o1")]) == 0, \
        capsys.readouterr().err
    assert main([str(tmp_path / "a.png"), "--model", model, "--gates", gates, "--out", str(tmp_path / "o2")]) == 0
    r1 = json.loads((tmp_path / "o1" / "a.json").read_text())
    r2 = json.loads((tmp_path / "o2" / "a.json").read_text())
    np.testing.assert_allclose(r1["patch_mask"], r2["patch_mask"], atol=1e-4)
    assert r1["label"] == r2["label"] and r1["gates_sha256"] == r2["gates_sha256"] == ex.gates.sha256
    assert r1["model"] == str(onnx_path)
