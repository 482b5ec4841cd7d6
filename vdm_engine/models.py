"""Model names the engine knows without a download: the embedded demo models and the hub presets.

``backbone`` (loading) and ``registry`` (gates lookup) both read these; neither imports the other.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["ASSETS", "EMBEDDED_MODELS", "PRESETS", "embedded_model_dir", "embedded_levels_dir", "resolve_preset"]

#: Folder of the embedded demo models (``<name>/backbone``, ``<name>/gates``).
ASSETS = Path(__file__).parent / "assets"
EMBEDDED_MODELS = ("vit-digits", "vit-toy")
PRESETS = {
    "vit-b16": "google/vit-base-patch16-224",
    "vit-b16-cifar10": "tanlq/vit-base-patch16-224-in21k-finetuned-cifar10",
    "vit-l16": "google/vit-large-patch16-224",
}


def embedded_model_dir(name: str) -> Path | None:
    """Folder of an embedded demo model (``backbone/`` and ``gates/`` inside), or None."""
    if name in EMBEDDED_MODELS:
        d = ASSETS / name
        return d if d.is_dir() else None
    return None


def embedded_levels_dir(name: str) -> Path | None:
    """Folder of the K-level gates shipped with an embedded model (``<name>/gates-levels``), or None."""
    d = embedded_model_dir(name)
    return d / "gates-levels" if d is not None and (d / "gates-levels").is_dir() else None


def resolve_preset(model: str) -> str:
    """The hub id of a preset name; any other name unchanged."""
    return PRESETS.get(str(model), str(model))
