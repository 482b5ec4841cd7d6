"""Faithfulness of patch attributions: perturbation curves, their areas, and localisation scores.

- ``metrics``: the maths as pure functions (``auc``, ``removal_gates``, ``perturbed_logits``,
  ``prf``, ``insertion_deletion_gates``, ``gini``, ``entropy``, ``spearman``, ...);
- ``road``: removal with noisy linear imputation (``noisy_linear_imputation``, ``road_logits``);
- ``randomisation``: the cascading model-randomisation sanity test;
- ``runner``: ``evaluate`` over many images and methods, ``evaluate_model`` from a model name;
- ``report``: ``versus_best_baseline`` (the level rule: ``level_with_best``), ``results_markdown`` and ``write_report``.
"""

from .metrics import (
    ORDERS,
    REPLACEMENTS,
    _topk_mask,
    auc,
    entropy,
    gini,
    insertion_deletion_gates,
    localisation_counts,
    patch_intensity,
    perturb_pixels,
    perturbed_logits,
    perturbed_logits_pixels,
    prf,
    removal_counts,
    removal_gates,
    replacement_pixels,
    spearman,
)
from .randomisation import randomisation_test, randomised_backbone
from .road import ROAD_NOISE, noisy_linear_imputation, road_logits
from .report import level_with_best, paired_difference, results_markdown, versus_best_baseline, write_report
from .runner import (
    DEFAULT_METRICS,
    METRICS,
    TOY_EVAL_SEED,
    EvalData,
    PerturbationConfig,
    check_data_spec,
    check_metrics,
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
    "insertion_deletion_gates",
    "gini",
    "entropy",
    "spearman",
    "patch_intensity",
    "ROAD_NOISE",
    "noisy_linear_imputation",
    "road_logits",
    "randomised_backbone",
    "randomisation_test",
    "METRICS",
    "DEFAULT_METRICS",
    "check_metrics",
    "evaluate",
    "EvalData",
    "check_data_spec",
    "load_eval_data",
    "evaluate_model",
    "paired_difference",
    "level_with_best",
    "versus_best_baseline",
    "results_markdown",
    "write_report",
]
