"""ONNX export of explainers: one fused graph (ViT + gate probes), validation, Triton repositories.

``main_export`` is ``vdm-export`` as one call (load, export, validate, time, Triton); ``export_onnx``
exports an explainer already in hand.

Importing this package does not import the exporter's heavy dependencies (onnxscript, onnxruntime)
until a function needs them.
"""

from .graph import DEFAULT_OUTPUTS, OUTPUTS, ExplainerGraph
from vdm_engine.metadata import ExportMetadata, gates_sha256, read_metadata
from .onnx import DEFAULT_OPSET, ExportError, ExportResult, export_onnx
from .main import MainExportResult, main_export
from .quantize import INT8_RECIPE, Int8Recipe, Int8Report, QuantizationError, export_int8, quantize_onnx
from .triton_repo import write_triton_repo
from .validate import TOLERANCES, ExportValidationError, check_onnx, validate_onnx

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
