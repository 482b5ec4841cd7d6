"""ONNX export of explainers: one fused graph (ViT + gate probes), validation, Triton repositories.

Importing this package does not import the exporter's heavy dependencies (onnxscript, onnxruntime)
until a function needs them.
"""

from .graph import DEFAULT_OUTPUTS, OUTPUTS, ExplainerGraph
from vdm_engine.metadata import ExportMetadata, gates_sha256, read_metadata
from .onnx import ExportError, ExportResult, export_onnx
from .triton_repo import write_triton_repo
from .validate import TOLERANCES, ExportValidationError, check_onnx, validate_onnx

__all__ = [
    "DEFAULT_OUTPUTS",
    "OUTPUTS",
    "TOLERANCES",
    "ExplainerGraph",
    "ExportError",
    "ExportMetadata",
    "ExportResult",
    "ExportValidationError",
    "check_onnx",
    "export_onnx",
    "gates_sha256",
    "read_metadata",
    "validate_onnx",
    "write_triton_repo",
]
