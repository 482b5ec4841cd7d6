"""vdm-engine: Vision DiffMask explanations of Vision Transformers at the cost of one forward pass.

The public names below are imported on first use (PEP 562): ``import vdm_engine`` and a console
script's ``--help`` or bad-usage error do not pay for importing torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ._lazy import lazy_names

__version__ = "0.1.0"

#: Public name -> the submodule that defines it.
_EXPORTS = {
    "PRESETS": "backbone",
    "Backbone": "backbone",
    "ImageSpec": "backbone",
    "WeightsUnavailableError": "backbone",
    "load_backbone": "backbone",
    "FAMILIES": "families",
    "UnsupportedModelError": "families",
    "Explainer": "explainer",
    "Explanation": "explainer",
    "GatesNotFoundError": "explainer",
    "Verification": "explainer",
    "GateConfig": "gates",
    "Gates": "gates",
    "Ops": "ops",
    "select_ops": "ops",
    "BackboneMismatchError": "provenance",
    "GatesProvenance": "provenance",
    "ProvenanceWarning": "provenance",
}

__all__ = sorted(_EXPORTS, key=str.lower) + ["__version__"]


__getattr__, __dir__ = lazy_names(__name__, _EXPORTS, __all__)

if TYPE_CHECKING:  # for type checkers and IDEs: the same names, imported eagerly
    from .backbone import PRESETS, Backbone, ImageSpec, WeightsUnavailableError, load_backbone
    from .explainer import Explainer, Explanation, GatesNotFoundError, Verification
    from .families import FAMILIES, UnsupportedModelError
    from .gates import GateConfig, Gates
    from .ops import Ops, select_ops
    from .provenance import BackboneMismatchError, GatesProvenance, ProvenanceWarning
