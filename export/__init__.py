"""ONNX export of explainers: one fused graph (ViT + gate probes), validation, Triton repositories.

``main_export`` is ``vdm-export`` as one call (load, export, validate, time, Triton); ``export_onnx``
exports an explainer already in hand; ``defaults`` holds the output names, opsets, tolerances and
Triton defaults (no torch).

The public names below are imported on first use (PEP 562): importing this package, and
``vdm-export --help``, import neither torch nor the exporter's heavy dependencies (onnxscript,
onnxruntime) until a name needs them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from vdm_engine._lazy import lazy_names

#: Public name -> the module that defines it (relative to this package unless absolute).
_EXPORTS = {
    "DEFAULT_OPSET": "defaults",
    "DEFAULT_OUTPUTS": "defaults",
    "INT8_RECIPE": "quantize",
    "OUTPUTS": "defaults",
    "TOLERANCES": "defaults",
    "ExplainerGraph": "graph",
    "ExportError": "onnx",
    "ExportMetadata": "vdm_engine.metadata",
    "ExportResult": "onnx",
    "ExportValidationError": "validate",
    "Int8Recipe": "quantize",
    "Int8Report": "quantize",
    "MainExportResult": "main",
    "QuantizationError": "quantize",
    "check_onnx": "validate",
    "export_int8": "quantize",
    "export_onnx": "onnx",
    "gates_sha256": "vdm_engine.metadata",
    "main_export": "main",
    "quantize_onnx": "quantize",
    "read_metadata": "vdm_engine.metadata",
    "validate_onnx": "validate",
    "write_triton_repo": "triton_repo",
}

__all__ = [
    "DEFAULT_OPSET",
    "DEFAULT_OUTPUTS",
    "INT8_RECIPE",
    "OUTPUTS",
    "TOLERANCES",
    "ExplainerGraph",
    "ExportError",
    "ExportMetadata",
    "ExportResult",
    "ExportValidationError",
    "Int8Recipe",
    "Int8Report",
    "MainExportResult",
    "QuantizationError",
    "check_onnx",
    "export_int8",
    "export_onnx",
    "gates_sha256",
    "main_export",
    "quantize_onnx",
    "read_metadata",
    "validate_onnx",
    "write_triton_repo",
]


__getattr__, __dir__ = lazy_names(__name__, _EXPORTS, __all__)

if TYPE_CHECKING:  # for type checkers and IDEs: the same names, imported eagerly
    from vdm_engine.metadata import ExportMetadata, gates_sha256, read_metadata

    from .defaults import DEFAULT_OPSET, DEFAULT_OUTPUTS, OUTPUTS, TOLERANCES
    from .graph import ExplainerGraph
    from .main import MainExportResult, main_export
    from .onnx import ExportError, ExportResult, export_onnx
    from .quantize import INT8_RECIPE, Int8Recipe, Int8Report, QuantizationError, export_int8, quantize_onnx
    from .triton_repo import write_triton_repo
    from .validate import ExportValidationError, check_onnx, validate_onnx
