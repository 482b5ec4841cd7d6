"""Faithfulness of patch attributions: perturbation curves, their areas, and localisation scores.

- ``metrics``: the maths as pure functions (``auc``, ``removal_gates``, ``perturbed_logits``,
  ``prf``, ...);
- ``runner``: ``evaluate`` over many images and methods, ``evaluate_model`` from a model name;
- ``report``: ``results_markdown`` and ``write_report``.
"""

from .metrics import (
    ORDERS,
    REPLACEMENTS,
    _topk_mask,
    auc,
    localisation_counts,
    perturb_pixels,
    perturbed_logits,
    perturbed_logits_pixels,
    prf,
    removal_counts,
    removal_gates,
    replacement_pixels,
)
from .report import paired_difference, results_markdown, write_report
from .runner import (
    TOY_EVAL_SEED,
    EvalData,
    PerturbationConfig,
    check_data_spec,
    evaluate,
    evaluate_model,
    load_eval_data,
)

__all__ = [
    "REPLACEMENTS",
    "ORDERS",
    "PerturbationConfig",
    "auc",
    "removal_counts",
    "removal_gates",
    "replacement_pixels",
    "perturb_pixels",
    "perturbed_logits",
    "perturbed_logits_pixels",
    "localisation_counts",
    "prf",
    "evaluate",
    "EvalData",
    "check_data_spec",
    "load_eval_data",
    "evaluate_model",
    "paired_difference",
    "results_markdown",
    "write_report",
]
