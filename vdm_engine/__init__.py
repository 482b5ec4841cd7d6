"""vdm-engine: Vision DiffMask explanations of Vision Transformers at the cost of one forward pass."""

from .backbone import PRESETS, Backbone, ImageSpec, WeightsUnavailableError, load_backbone
from .explainer import Explainer, Explanation, GatesNotFoundError, Verification
from .gates import GateConfig, Gates

__version__ = "0.1.0"

__all__ = [
    "PRESETS",
    "Backbone",
    "Explainer",
    "Explanation",
    "GateConfig",
    "Gates",
    "GatesNotFoundError",
    "ImageSpec",
    "Verification",
    "WeightsUnavailableError",
    "load_backbone",
    "__version__",
]
