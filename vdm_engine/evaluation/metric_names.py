"""The metrics ``evaluate`` / ``vdm-eval`` can measure, by name (no torch: the CLI's parser reads them)."""

from __future__ import annotations

from typing import Iterable

__all__ = ["METRICS", "DEFAULT_METRICS", "check_metrics"]

#: What ``evaluate`` can measure. ``randomisation`` needs to rebuild the methods on other models, so
#: ``evaluate_model`` runs it (``randomisation.randomisation_test``), not ``evaluate``.
METRICS = ("perturbation", "insertion-deletion", "road", "sparseness", "complexity", "intensity", "randomisation")
DEFAULT_METRICS = METRICS


def check_metrics(metrics: Iterable[str]) -> tuple[str, ...]:
    """Normalise and validate metric names; raise ``ValueError`` naming the first unknown one."""
    names = tuple(dict.fromkeys(m.strip().lower() for m in metrics if m.strip()))
    if not names:
        raise ValueError(f"no metrics given; expected a comma-separated subset of {','.join(METRICS)}")
    bad = [m for m in names if m not in METRICS]
    if bad:
        raise ValueError(f"unknown metric {bad[0]!r}; expected one of {', '.join(METRICS)}")
    return names
