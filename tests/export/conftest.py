"""Exports shared by the export tests: each tiny graph is exported once per session."""

from __future__ import annotations

import pytest

from vdm_engine import Explainer
from vdm_engine.ops import Ops, reference_ops

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

ALL_OUTPUTS = ("logits", "patch_mask", "layer_masks", "masked_logits", "kl")
MASK_ONLY_OUTPUTS = ("logits", "patch_mask")


@pytest.fixture(scope="session")
def export_explainer(shared_tiny_explainer) -> Explainer:
    return shared_tiny_explainer


@pytest.fixture(scope="session")
def full_export(export_explainer, tmp_path_factory):
    """fp32, dynamic batch, every output (two encoder passes)."""
    from vdm_engine.export import export_onnx

    path = tmp_path_factory.mktemp("full") / "full.onnx"
    return export_onnx(export_explainer, path, outputs=ALL_OUTPUTS)


def _raising(*args, **kwargs):
    raise AssertionError("a fast path was called while exporting")


@pytest.fixture(scope="session")
def mask_only_export(export_explainer, tmp_path_factory):
    """logits and patch_mask only, weights as external data, and fast-path hooks that must not be traced."""
    from vdm_engine.export import export_onnx

    ex = export_explainer
    ex.ops = Ops(_raising, _raising, "poisoned", "the export must use reference_ops()")
    try:
        path = tmp_path_factory.mktemp("mask_only") / "mask.onnx"
        result = export_onnx(ex, path, outputs=MASK_ONLY_OUTPUTS, external_data=True)
    finally:
        ex.ops = reference_ops()
    return result
