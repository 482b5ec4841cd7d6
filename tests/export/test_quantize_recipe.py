"""``INT8_RECIPE`` on the shipped vit-digits graph: what it writes, and that it holds the thresholds."""

from __future__ import annotations

import dataclasses

import onnx
import pytest

from vdm_engine.export.quantize import (
    INT8_RECIPE,
    MATMUL_ONLY_RECIPE,
    MIN_AGREEMENT,
    MIN_IOU,
    Int8Recipe,
    check_int8,
    compare_int8,
    export_int8,
    quantize_onnx,
)
from vdm_engine.metadata import read_metadata


@pytest.fixture(scope="module")
def digits_held_out(digits_onnx):
    """The 300 vit-digits test digits as graph inputs (the images ``vdm-export --quantize int8`` checks
    on), preprocessed from the graph's metadata (no checkpoint load)."""
    from vdm_engine.data import digits_split
    from vdm_engine.runtime import OnnxExplainer

    try:
        images = digits_split("test")[0]
    except ValueError as e:  # scikit-learn missing
        pytest.skip(str(e))
    return OnnxExplainer(digits_onnx, "cpu").preprocess(images).numpy()


def _ops(path):
    return [n.op_type for n in onnx.load(str(path)).graph.node]


def test_recipe_is_one_frozen_value():
    assert INT8_RECIPE.fuse and INT8_RECIPE.op_types == ("MatMul", "Gemm") and INT8_RECIPE.reduce_range
    assert INT8_RECIPE.keep_probes_fp32
    assert not (MATMUL_ONLY_RECIPE.fuse or MATMUL_ONLY_RECIPE.reduce_range or MATMUL_ONLY_RECIPE.keep_probes_fp32)
    assert INT8_RECIPE.describe() == "MatMul/Gemm in int8 (fused, 7-bit weights, probes fp32)"
    bare = Int8Recipe(op_types=None, fuse=False, reduce_range=False, keep_probes_fp32=False)
    assert bare.describe() == "all op types in int8"
    with pytest.raises(dataclasses.FrozenInstanceError):
        INT8_RECIPE.fuse = False


@pytest.mark.parametrize("recipe", [INT8_RECIPE, Int8Recipe(keep_probes_fp32=False)], ids=["default", "probes-int8"])
def test_vit_digits_int8_holds_thresholds(recipe, digits_onnx, digits_held_out, tmp_path):
    """Quantized with the recipe, the vit-digits graph agrees with its fp32 graph on >= 99% of the 300
    test digits and keeps the same patches (mean IoU >= 0.95); fused nodes and int8 matmuls are in
    it, and with ``keep_probes_fp32`` (the default) the probes' matmuls stay float32."""
    out = tmp_path / "int8.onnx"
    if recipe is INT8_RECIPE:
        report = export_int8(digits_onnx, out, digits_held_out)  # what vdm-export runs; raises below the thresholds
    else:
        quantize_onnx(digits_onnx, out, recipe=recipe)
        report = check_int8(compare_int8(digits_onnx, out, digits_held_out, method="dynamic"))
    assert report.images == 300 and report.agreement >= MIN_AGREEMENT and report.mean_iou >= MIN_IOU, report.summary()
    ops = _ops(out)
    assert "SkipLayerNormalization" in ops and "BiasGelu" in ops and "MatMulInteger" in ops
    assert "ConvInteger" not in ops  # Conv is not in the recipe's op types
    model = onnx.load(str(out))
    probe_inits = {t.name for t in model.graph.initializer if t.name.startswith("probes.")}
    float_probe_matmuls = [n for n in model.graph.node if n.op_type == "MatMul" and probe_inits.intersection(n.input)]
    if recipe.keep_probes_fp32:
        assert len(float_probe_matmuls) == 2 + 5  # h0, second layer, and one per depth (L+2 = 5)
    else:
        assert float_probe_matmuls == []
    assert read_metadata(out).extra["int8_recipe"] == recipe.describe()
