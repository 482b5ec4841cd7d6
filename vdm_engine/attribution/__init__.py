"""Baseline patch attributions on the same backbone, behind the interface DiffMask's explainer shares.

Every method maps ``pixel_values (B, 3, H, W)`` to patch scores ``(B, N)`` (higher = more relevant):

- ``diffmask``: the trained gates' keep probabilities (one forward pass);
- ``diffmask-path``: the one-pass ranking of K-level gates (sparsest level keeping each patch);
- ``rollout``: attention rollout, lowest attentions discarded per image;
- ``gradcam``: Grad-CAM on the last block's input tokens;
- ``chefer``: gradient-weighted attention relevance (Chefer et al., 2021);
- ``ig``: Integrated Gradients via captum (optional), summed per patch;
- ``random``: reproducible uniform scores.

Use ``get_method(name, explainer)``.
"""

from __future__ import annotations

from .methods import (
    Attribution,
    CheferAttribution,
    DiffMaskAttribution,
    DiffMaskPathAttribution,
    GradCamAttribution,
    IntegratedGradientsAttribution,
    RandomAttribution,
    RolloutAttribution,
)

__all__ = [
    "METHODS",
    "Attribution",
    "CheferAttribution",
    "DiffMaskAttribution",
    "DiffMaskPathAttribution",
    "GradCamAttribution",
    "IntegratedGradientsAttribution",
    "RandomAttribution",
    "RolloutAttribution",
    "available_methods",
    "get_method",
]

METHODS = {
    "diffmask": DiffMaskAttribution,
    "diffmask-path": DiffMaskPathAttribution,
    "rollout": RolloutAttribution,
    "gradcam": GradCamAttribution,
    "chefer": CheferAttribution,
    "ig": IntegratedGradientsAttribution,
    "random": RandomAttribution,
}


def available_methods() -> list[str]:
    """Method names usable here (``ig`` only when captum is installed)."""
    names = list(METHODS)
    try:
        import captum.attr  # noqa: F401
    except ImportError:
        names.remove("ig")
    return names


def get_method(name: str, explainer=None, *, backbone=None, **options) -> Attribution:
    """Build an attribution method by name.

    Args:
        name: one of ``METHODS``.
        explainer: a ``vdm_engine.Explainer``; required for ``diffmask`` (and ``diffmask-path``,
            with K-level gates), and its backbone serves the other methods.
        backbone: a ``vdm_engine.Backbone`` for the baselines when no explainer is given.
        options: method-specific keyword arguments (e.g. ``n_steps`` for ``ig``, ``discard_ratio``
            for ``rollout``, ``seed`` for ``random``).

    Raises:
        ValueError: unknown name, missing explainer/backbone, or a missing optional dependency.
    """
    key = str(name).strip().lower()
    if key not in METHODS:
        raise ValueError(f"unknown attribution method {name!r}; expected one of {', '.join(METHODS)}")
    if key in ("diffmask", "diffmask-path"):
        if explainer is None:
            raise ValueError(f"the {key!r} method needs an Explainer (trained gates); pass explainer=")
        return METHODS[key](explainer, **options)
    if backbone is None:
        if explainer is None:
            raise ValueError(f"the {key!r} method needs an explainer or a backbone")
        backbone = explainer.backbone
    return METHODS[key](backbone, **options)
