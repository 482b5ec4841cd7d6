"""Faithfulness of patch attributions: perturbation curves, their areas, and localisation scores.

- ``metrics``: the maths as pure functions (``auc``, ``removal_gates``, ``perturbed_logits``,
  ``prf``, ``insertion_deletion_gates``, ``gini``, ``entropy``, ``spearman``, ...);
- ``road``: removal with noisy linear imputation (``noisy_linear_imputation``, ``road_logits``);
- ``randomisation``: the cascading model-randomisation sanity test;
- ``runner``: ``evaluate`` over many images and methods, ``evaluate_model`` from a model name;
- ``metric_names``: ``METRICS`` and ``check_metrics`` (no torch);
- ``report``: ``versus_best_baseline`` (the level rule: ``level_with_best``), ``results_markdown`` and ``write_report``.

The public names below are imported on first use (PEP 562), so ``vdm-eval --help`` and its usage
errors do not pay for importing torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_names

#: Public name -> the submodule that defines it.
_EXPORTS = {
    "ORDERS": "metrics",
    "REPLACEMENTS": "metrics",
    "_topk_mask": "metrics",
    "auc": "metrics",
    "entropy": "metrics",
    "gini": "metrics",
    "insertion_deletion_gates": "metrics",
    "localisation_counts": "metrics",
    "patch_intensity": "metrics",
    "perturb_pixels": "metrics",
    "perturbed_logits": "metrics",
    "perturbed_logits_pixels": "metrics",
    "prf": "metrics",
    "removal_counts": "metrics",
    "removal_gates": "metrics",
    "replacement_pixels": "metrics",
    "spearman": "metrics",
    "randomisation_test": "randomisation",
    "randomised_backbone": "randomisation",
    "ROAD_NOISE": "road",
    "noisy_linear_imputation": "road",
    "road_logits": "road",
    "level_with_best": "report",
    "paired_difference": "report",
    "results_markdown": "report",
    "versus_best_baseline": "report",
    "versus_best_baselines": "report",
    "write_report": "report",
    "DEFAULT_METRICS": "metric_names",
    "METRICS": "metric_names",
    "check_metrics": "metric_names",
    "TOY_EVAL_SEED": "runner",
    "EvalData": "runner",
    "PerturbationConfig": "runner",
    "check_data_spec": "runner",
    "evaluate": "runner",
    "evaluate_model": "runner",
    "load_eval_data": "runner",
}

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
    "versus_best_baselines",
    "results_markdown",
    "write_report",
]


__getattr__, __dir__ = lazy_names(__name__, _EXPORTS, __all__)

if TYPE_CHECKING:  # for type checkers and IDEs: the same names, imported eagerly
    from .metrics import (
        _topk_mask,
        auc,
        entropy,
        gini,
        insertion_deletion_gates,
        localisation_counts,
        ORDERS,
        patch_intensity,
        perturb_pixels,
        perturbed_logits,
        perturbed_logits_pixels,
        prf,
        removal_counts,
        removal_gates,
        replacement_pixels,
        REPLACEMENTS,
        spearman,
    )
    from .randomisation import randomisation_test, randomised_backbone
    from .road import noisy_linear_imputation, road_logits, ROAD_NOISE
    from .report import (
        level_with_best,
        paired_difference,
        results_markdown,
        versus_best_baseline,
        versus_best_baselines,
        write_report,
    )
    from .metric_names import check_metrics, DEFAULT_METRICS, METRICS
    from .runner import (
        check_data_spec,
        EvalData,
        evaluate,
        evaluate_model,
        load_eval_data,
        PerturbationConfig,
        TOY_EVAL_SEED,
    )
