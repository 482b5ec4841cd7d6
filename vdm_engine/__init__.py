"""vdm-engine: Vision DiffMask explanations of Vision Transformers at the cost of one forward pass."""

from .backbone import PRESETS, Backbone, ImageSpec, WeightsUnavailableError, load_backbone
from .families import FAMILIES, UnsupportedModelError
from .explainer import Explainer, Explanation, GatesNotFoundError, Verification
from .gates import GateConfig, Gates
from .ops import Ops, select_ops
from .provenance import BackboneMismatchError, GatesProvenance, ProvenanceWarning

__version__ = "0.1.0"

__all__ = [
    "PRESETS",
    "Backbone",
    "BackboneMismatchError",
    "Explainer",
    "Explanation",
    "FAMILIES",
    "GateConfig",
    "Gates",
    "GatesNotFoundError",
    "GatesProvenance",
    "ImageSpec",
    "Ops",
    "ProvenanceWarning",
    "UnsupportedModelError",
    "Verification",
    "WeightsUnavailableError",
    "load_backbone",
    "select_ops",
    "__version__",
]
