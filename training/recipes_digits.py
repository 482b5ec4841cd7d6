"""The vit-digits gate recipe study: ``python -m vdm_engine.training.recipes_digits --out DIR [--variants a,b]``.

Every variant trains DiffMask gates for the shipped vit-digits backbone with one change to the
shipped recipe (``recipes.GATE_CONFIGS["digits"]``), and, when it names KL budgets in ``levels``,
the K-level gates of a DiffMask path whose main level is the variant's own single-level gates.
Each is scored on the 300 held-out test digits with the cheap metrics only (no randomisation):
kept fraction, agreement and KL of the hard mask, the 10-step perturbation curves and the
one-patch-at-a-time insertion/deletion curves under noise and mean replacement, ROAD, and the
paired per-image difference of every AUC to Chefer et al. relevance (the best baseline on these
digits). ``DIR/results.json`` keeps every variant tried (rewritten atomically after each one, so an
interrupted study continues where it stopped) and ``DIR/results.md`` its tables. Trained levels are
cached by their settings (``--cache``, default ``DIR/cache``) and shared by the variants that use them.

The issue's target (``target_check``): the path's least-relevant-first / insertion AUCs at least level
with Chefer's (paired difference's 95% interval reaches 0 or above) under noise, mean and ROAD, its
most-relevant-first / deletion AUCs within one standard error of Chefer's, and the single-level
mask keeping <= 45% of the patches at >= 97% agreement.

The backbone's patch size is fixed (8 pixels on 32: a 4x4 grid), so a finer grid needs another
classifier; ``recipes`` records the 8x8-grid model tried earlier (it ranked worse).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from vdm_engine.masks import patch_rank

__all__ = ["DigitsVariant", "VARIANTS", "train_variant", "score_variant", "target_check", "RANKINGS",
           "score_rankings", "study", "study_rankings", "ship", "main"]

TEST_IMAGES = 300
CHEFER = "chefer"
# Curves scored, as (metric, setting, order); the first order of each pair is most relevant first.
CURVES = (
    ("perturbation", "noise", "positive"), ("perturbation", "noise", "negative"),
    ("perturbation", "mean", "positive"), ("perturbation", "mean", "negative"),
    ("insertion-deletion", "noise", "deletion"), ("insertion-deletion", "noise", "insertion"),
    ("insertion-deletion", "mean", "deletion"), ("insertion-deletion", "mean", "insertion"),
    ("road", None, "positive"), ("road", None, "negative"),
)
_LOWER_BETTER = ("positive", "deletion")


@dataclass(frozen=True)
class DigitsVariant:
    """One gate recipe for vit-digits.

    Attributes:
        name: short id (the row of the results).
        note: what changed against the shipped recipe.
        train: ``TrainConfig`` fields over the shipped digits settings (steps 1000, eps 0.1, ...).
        samples: hard-concrete mask samples per image in a batch (the batch keeps 64 rows:
            64 // samples distinct images, each repeated).
        placeholder: ``learned`` (a trained vector) or ``zeros`` (fixed zero patch embedding).
        levels: KL budgets of the path's levels, least sparse (smallest budget) first; the variant's
            own ``eps`` must be one of them (the main level: its single-level gates). Empty: no path.
        level_steps: training steps of the path's other levels.
        level_agreement: the agreement a sparser level's validation must reach to be selected
            (a level sparser than the main one is a ranking device, not a faithful mask).
        level_train: ``TrainConfig`` fields for the other levels only, over ``train``.
        dense_placeholder: ``zeros`` trains the levels denser than the main one with a fixed zero placeholder
            (they order the patches the main level drops); empty: the variant's ``placeholder``.
        sparse_placeholder: the same for the levels sparser than the main one (they order its kept patches).
        sparse_replacement: ``TrainConfig.replacement`` of the levels sparser than the main one, e.g.
            ``placeholder+zeros`` (half the rows of a batch the learned placeholder, half zeros) or
            ``mean+noise`` (evaluation's replacements); empty: every row the placeholder.
        deletion_levels: KL floors delta of deletion-trained levels (``TrainConfig.objective = "delete"``:
            the fewest patches removed such that KL >= delta), appended after ``levels`` as the
            sparsest levels in the given order, so the patches whose removal changes the prediction
            rank first. Each trains ``level_steps`` steps over ``train`` and ``level_train`` and is
            selected at validation KL >= delta / 2 and agreement <= ``level_agreement``.
        deletion_replacement: ``TrainConfig.replacement`` of the deletion levels; empty: ``sparse_replacement``.
        main: ``trained`` (the variant's own single-level gates, from ``train``) or ``shipped`` (the gates file
            vit-digits ships as the main level, so the path's ``patch_mask`` is the shipped mask; ``train`` may
            then only set the other levels' ``seed``).
    """

    name: str
    note: str
    train: dict = field(default_factory=dict)
    samples: int = 1
    placeholder: str = "learned"
    levels: tuple = ()
    level_steps: int = 600
    level_agreement: float = 0.5
    level_train: dict = field(default_factory=dict)
    dense_placeholder: str = ""
    sparse_placeholder: str = ""
    sparse_replacement: str = ""
    deletion_levels: tuple = ()
    deletion_replacement: str = ""
    main: str = "trained"

    def __post_init__(self):
        if self.samples < 1 or 64 % self.samples:
            raise ValueError(f"DigitsVariant.samples must divide the batch of 64, got {self.samples}")
        if self.placeholder not in ("learned", "zeros"):
            raise ValueError(f"DigitsVariant.placeholder must be 'learned' or 'zeros', got {self.placeholder!r}")
        for name in ("dense_placeholder", "sparse_placeholder"):
            if getattr(self, name) not in ("", "learned", "zeros"):
                raise ValueError(f"DigitsVariant.{name} must be '', 'learned' or 'zeros', got {getattr(self, name)!r}")
        for prefix in ("sparse", "deletion"):
            if getattr(self, f"{prefix}_replacement"):
                from .replacement import replacement_kinds

                try:
                    replacement_kinds(getattr(self, f"{prefix}_replacement"))
                except ValueError as e:
                    raise ValueError(f"DigitsVariant.{prefix}_{e}") from None
        if self.main not in ("trained", "shipped"):
            raise ValueError(f"DigitsVariant.main must be 'trained' or 'shipped', got {self.main!r}")
        if self.main == "shipped" and (set(self.train) - {"seed"} or self.samples != 1 or self.placeholder != "learned"):
            raise ValueError("DigitsVariant.main='shipped' takes the shipped recipe's main level: train may only set "
                             f"the seed, got train={self.train}, samples={self.samples}, placeholder={self.placeholder!r}")
        if self.deletion_levels and (not self.levels or any(not d > 0 for d in self.deletion_levels)):
            raise ValueError(f"DigitsVariant.deletion_levels must be KL floors > 0 added to a path (levels), "
                             f"got {self.deletion_levels} with levels {self.levels}")
        if self.levels:
            if list(self.levels) != sorted(self.levels) or len(set(self.levels)) != len(self.levels):
                raise ValueError(f"DigitsVariant.levels must be increasing KL budgets, got {self.levels}")
            if self.eps not in self.levels:
                raise ValueError(f"DigitsVariant.levels {self.levels} must include the main level's eps {self.eps}")

    @property
    def eps(self) -> float:
        from .recipes import GATE_CONFIGS

        return float(self.train.get("eps", GATE_CONFIGS["digits"].get("eps", 0.1)))


# Every variant tried, in the order tried. A path variant reuses the main level of the variant with
# the same single-level settings (the level cache keys on the settings, not the name).
VARIANTS = [
    DigitsVariant("shipped-recipe", "the shipped recipe (probe width 16 = D/4, eps 0.1, adaptive depth, learned placeholder)"),
    DigitsVariant("path-3-sparse", "K=3, budgets 0.1/0.5/2.0: the extra levels sparser than the main one",
                  levels=(0.1, 0.5, 2.0)),
    DigitsVariant("seed-1", "the shipped recipe with seed 1 (the run-to-run spread of one recipe)", train={"seed": 1}),
    DigitsVariant("probe-8", "probe width 8", train={"probe_size": 8}),
    DigitsVariant("last-depth-4", "the last depth (the explanation's mask) sampled 4 shares more",
                  train={"last_depth_weight": 4.0}),
    DigitsVariant("uniform-depth", "depths sampled uniformly (not by alpha)", train={"depth_sampling": "uniform"}),
    DigitsVariant("last-depth-4-sel97", "last depth sampled 4 shares more, and checkpoints selected at agreement "
                  ">= 97% on the validation digits (not 95%)", train={"last_depth_weight": 4.0, "agreement": 0.97}),
    DigitsVariant("path-last-depth-3", "K=3, budgets 0.03/0.1/0.3 with the last-depth-4 recipe for every level",
                  train={"last_depth_weight": 4.0}, levels=(0.03, 0.1, 0.3)),
    DigitsVariant("path-uniform-levels", "K=3, budgets 0.03/0.1/0.3: the main level the shipped recipe, the other two "
                  "trained with uniform depth sampling", levels=(0.03, 0.1, 0.3), level_train={"depth_sampling": "uniform"}),
    DigitsVariant("path-4-uniform", "K=4, budgets 0.03/0.1/0.2/0.5: the main level the shipped recipe, the others "
                  "with uniform depth sampling", levels=(0.03, 0.1, 0.2, 0.5), level_train={"depth_sampling": "uniform"}),
    DigitsVariant("path-4-uniform-eps-0.2", "K=4, budgets 0.03/0.1/0.2/0.5: the main level the eps-0.2 variant, the "
                  "others with uniform depth sampling", train={"eps": 0.2, "eps_valid": 0.3}, levels=(0.03, 0.1, 0.2, 0.5),
                  level_train={"depth_sampling": "uniform"}),
    DigitsVariant("samples-4", "4 mask samples per image (16 images x 4 per batch of 64)", samples=4),
    DigitsVariant("placeholder-zeros", "no learned placeholder: dropped patches become zero embeddings",
                  placeholder="zeros"),
    DigitsVariant("eps-0.2", "KL budget 0.2 (eps_valid 0.3)", train={"eps": 0.2, "eps_valid": 0.3}),
    DigitsVariant("alpha-5", "Lagrangian schedule: alpha starts at 5 (not 20), slower ascent (lr_alpha 0.1)",
                  train={"alpha_init": 5.0, "lr_alpha": 0.1}),
    DigitsVariant("l0-log", "log-L0 penalty (the paper's form)", train={"l0": "log"}),
    DigitsVariant("placeholder-fast", "placeholder learning rate 1e-2 (not 1e-3)", train={"lr_placeholder": 1e-2}),
    DigitsVariant("probe-4", "probe width 4", train={"probe_size": 4}),
    DigitsVariant("probe-32", "probe width 32", train={"probe_size": 32}),
    DigitsVariant("eps-0.05", "KL budget 0.05 (eps_valid 0.075)", train={"eps": 0.05, "eps_valid": 0.075}),
    DigitsVariant("steps-2000", "2000 steps (not 1000)", train={"steps": 2000}),
    DigitsVariant("path-3-narrow", "K=3, budgets 0.03/0.1/0.3 (the shipped K=3 spacing, 600-step levels)",
                  levels=(0.03, 0.1, 0.3)),
    DigitsVariant("path-dense-5", "K=5, budgets 0.003/0.01/0.03/0.1/0.3: three levels denser than the main one, "
                  "so the patches the main level drops are ordered by the budget that drops them",
                  levels=(0.003, 0.01, 0.03, 0.1, 0.3)),
    DigitsVariant("path-8", "K=8, budgets 0.001 .. 2.0 (four levels denser than the main one, three sparser)",
                  levels=(0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 2.0)),
    DigitsVariant("path-4", "K=4, budgets 0.1/0.3/1.0/3.0", levels=(0.1, 0.3, 1.0, 3.0)),
    DigitsVariant("path-4-wide", "K=4, budgets 0.03/0.1/0.5/2.0 (one level denser, two sparser)",
                  levels=(0.03, 0.1, 0.5, 2.0)),
    DigitsVariant("path-zeros-dense", "K=4, budgets 0.01/0.03/0.1/0.3: the two levels denser than the main one "
                  "trained with a zero placeholder (they order the patches the main level drops)",
                  levels=(0.01, 0.03, 0.1, 0.3), dense_placeholder="zeros"),
    DigitsVariant("path-7", "K=7, budgets 0.001 .. 1.0: path-8 without its 2.0 level (which kept more than the 1.0 one)",
                  levels=(0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0)),
    DigitsVariant("path-zeros-sparse", "K=4, budgets 0.03/0.1/0.3/1.0: the two levels sparser than the main one "
                  "trained with a zero placeholder (they order the patches the main level keeps)",
                  levels=(0.03, 0.1, 0.3, 1.0), sparse_placeholder="zeros"),
    DigitsVariant("path-zeros-sparse-seed-1", "path-zeros-sparse with seed 1 for every level (is its gain under noise "
                  "more than the run-to-run spread?)", train={"seed": 1}, levels=(0.03, 0.1, 0.3, 1.0),
                  sparse_placeholder="zeros"),
    DigitsVariant("path-zeros-sparse-seed-2", "path-zeros-sparse with seed 2 for every level", train={"seed": 2},
                  levels=(0.03, 0.1, 0.3, 1.0), sparse_placeholder="zeros"),
    DigitsVariant("path-mixed-sparse", "K=4, budgets 0.03/0.1/0.3/1.0: the two levels sparser than the main one trained "
                  "with a mixed replacement (alternate rows of a batch the learned placeholder / a zero placeholder)",
                  levels=(0.03, 0.1, 0.3, 1.0), sparse_replacement="placeholder+zeros"),
    DigitsVariant("path-mixed-sparse-seed-1", "path-mixed-sparse with seed 1 for every level", train={"seed": 1},
                  levels=(0.03, 0.1, 0.3, 1.0), sparse_replacement="placeholder+zeros"),
    DigitsVariant("path-eval-sparse", "K=4, budgets 0.03/0.1/0.3/1.0: the two levels sparser than the main one trained "
                  "with evaluation's replacements (alternate rows: the image's mean patch / a uniform-noise patch)",
                  levels=(0.03, 0.1, 0.3, 1.0), sparse_replacement="mean+noise"),
    DigitsVariant("path-eval-sparse-seed-1", "path-eval-sparse with seed 1 for every level", train={"seed": 1},
                  levels=(0.03, 0.1, 0.3, 1.0), sparse_replacement="mean+noise"),
    DigitsVariant("path-mixed-sparse-seed-2", "path-mixed-sparse with seed 2 for every level", train={"seed": 2},
                  levels=(0.03, 0.1, 0.3, 1.0), sparse_replacement="placeholder+zeros"),
    DigitsVariant("path-mixed4-sparse", "K=4, budgets 0.03/0.1/0.3/1.0: the two levels sparser than the main one trained "
                  "with four replacements cycled over the rows (learned placeholder, zeros, the image's mean patch, "
                  "a uniform-noise patch)", levels=(0.03, 0.1, 0.3, 1.0), sparse_replacement="placeholder+zeros+mean+noise"),
    DigitsVariant("path-mixed-5", "K=5, budgets 0.03/0.1/0.3/1.0/2.0: path-mixed-sparse with a third sparser level "
                  "(2.0, mixed replacement) to order the patches kept last", levels=(0.03, 0.1, 0.3, 1.0, 2.0),
                  sparse_replacement="placeholder+zeros"),
    DigitsVariant("path-zeros-mean-sparse", "K=4, budgets 0.03/0.1/0.3/1.0: the two levels sparser than the main one "
                  "trained with alternate rows a zero placeholder / the image's mean patch",
                  levels=(0.03, 0.1, 0.3, 1.0), sparse_replacement="zeros+mean"),
    DigitsVariant("path-mixed-5-seed-1", "path-mixed-5 with seed 1 for every level", train={"seed": 1},
                  levels=(0.03, 0.1, 0.3, 1.0, 2.0), sparse_replacement="placeholder+zeros"),
    DigitsVariant("path-mixed-6", "K=6, budgets 0.03/0.1/0.3/1.0/2.0/4.0: path-mixed-5 with a fourth sparser level",
                  levels=(0.03, 0.1, 0.3, 1.0, 2.0, 4.0), sparse_replacement="placeholder+zeros"),
    DigitsVariant("path-mixed-5-seed-2", "path-mixed-5 with seed 2 for every level", train={"seed": 2},
                  levels=(0.03, 0.1, 0.3, 1.0, 2.0), sparse_replacement="placeholder+zeros"),
    DigitsVariant("path-mixed-6b", "K=6, budgets 0.03/0.1/0.3/1.0/2.0/3.0: path-mixed-5 with a 3.0 level (4.0 keeps nothing) "
                  "to order the two or three patches removed first", levels=(0.03, 0.1, 0.3, 1.0, 2.0, 3.0),
                  sparse_replacement="placeholder+zeros"),
    DigitsVariant("path-mixed-6b-seed-1", "path-mixed-6b with seed 1 for every level", train={"seed": 1},
                  levels=(0.03, 0.1, 0.3, 1.0, 2.0, 3.0), sparse_replacement="placeholder+zeros"),
    DigitsVariant("path-mixed-6c", "path-mixed-6b with the sparser levels selected at >= 30% validation agreement "
                  "(not 50%; the 3.0 level of path-mixed-6b was selected at step 200-300, less sparse than the 2.0 one)",
                  levels=(0.03, 0.1, 0.3, 1.0, 2.0, 3.0), sparse_replacement="placeholder+zeros", level_agreement=0.3),
    DigitsVariant("path-mixed-6c-seed-1", "path-mixed-6c with seed 1 for every level", train={"seed": 1},
                  levels=(0.03, 0.1, 0.3, 1.0, 2.0, 3.0), sparse_replacement="placeholder+zeros", level_agreement=0.3),
    DigitsVariant("path-mixed4-5", "K=5, budgets 0.03/0.1/0.3/1.0/2.0: path-mixed-5 with the four replacements of "
                  "path-mixed4-sparse for the sparser levels (does the mean patch in training help the mean-replacement "
                  "positive test?)", levels=(0.03, 0.1, 0.3, 1.0, 2.0), sparse_replacement="placeholder+zeros+mean+noise"),
    DigitsVariant("path-mixed4-5-seed-1", "path-mixed4-5 with seed 1 for every level", train={"seed": 1},
                  levels=(0.03, 0.1, 0.3, 1.0, 2.0), sparse_replacement="placeholder+zeros+mean+noise"),
    DigitsVariant("path-mixed-5-long", "path-mixed-5 with 1200-step levels (not 600)", levels=(0.03, 0.1, 0.3, 1.0, 2.0),
                  sparse_replacement="placeholder+zeros", level_steps=1200),
    DigitsVariant("path-mixed-5-long-seed-1", "path-mixed-5-long with seed 1 for every level", train={"seed": 1},
                  levels=(0.03, 0.1, 0.3, 1.0, 2.0), sparse_replacement="placeholder+zeros", level_steps=1200),
]
_MIXED_5 = {"levels": (0.03, 0.1, 0.3, 1.0, 2.0), "sparse_replacement": "placeholder+zeros"}
VARIANTS += [
    DigitsVariant("path-mixed-5-del-1", "path-mixed-5 with a deletion level (fewest patches removed with KL >= 1.0, "
                  "mixed replacement placeholder/zeros) as the sparsest level: the necessary patches rank first",
                  deletion_levels=(1.0,), **_MIXED_5),
    DigitsVariant("path-mixed-5-del-1-seed-1", "path-mixed-5-del-1 with seed 1 for every level", train={"seed": 1},
                  deletion_levels=(1.0,), **_MIXED_5),
    DigitsVariant("path-mixed-5-del-2", "path-mixed-5 with a deletion level at KL >= 2.0 (placeholder/zeros)",
                  deletion_levels=(2.0,), **_MIXED_5),
    DigitsVariant("path-mixed-5-del-2-seed-1", "path-mixed-5-del-2 with seed 1 for every level", train={"seed": 1},
                  deletion_levels=(2.0,), **_MIXED_5),
    DigitsVariant("path-mixed-5-del-1-zm", "path-mixed-5 with a deletion level at KL >= 1.0 trained with rows cycling "
                  "the learned placeholder, zeros and the image's mean patch", deletion_levels=(1.0,),
                  deletion_replacement="placeholder+zeros+mean", **_MIXED_5),
    DigitsVariant("path-mixed-5-del-1-zm-seed-1", "path-mixed-5-del-1-zm with seed 1 for every level", train={"seed": 1},
                  deletion_levels=(1.0,), deletion_replacement="placeholder+zeros+mean", **_MIXED_5),
    DigitsVariant("path-mixed-5-del-2-zm", "path-mixed-5 with a deletion level at KL >= 2.0 trained with rows cycling "
                  "the learned placeholder, zeros and the image's mean patch", deletion_levels=(2.0,),
                  deletion_replacement="placeholder+zeros+mean", **_MIXED_5),
    DigitsVariant("path-mixed-5-del-2-zm-seed-1", "path-mixed-5-del-2-zm with seed 1 for every level", train={"seed": 1},
                  deletion_levels=(2.0,), deletion_replacement="placeholder+zeros+mean", **_MIXED_5),
    DigitsVariant("path-mixed-5-del-1-mean", "path-mixed-5 with a deletion level at KL >= 1.0 trained with the image's "
                  "mean patch for every row (the mean-replacement test's replacement)", deletion_levels=(1.0,),
                  deletion_replacement="mean", **_MIXED_5),
    DigitsVariant("path-mixed-5-del-1-mean-seed-1", "path-mixed-5-del-1-mean with seed 1 for every level",
                  train={"seed": 1}, deletion_levels=(1.0,), deletion_replacement="mean", **_MIXED_5),
    DigitsVariant("path-mixed-5-del-21", "path-mixed-5 with two deletion levels (placeholder/zeros): KL >= 2.0, then "
                  "KL >= 1.0 as the sparsest (it removes fewer patches)", deletion_levels=(2.0, 1.0), **_MIXED_5),
    DigitsVariant("path-mixed-5-del-21-seed-1", "path-mixed-5-del-21 with seed 1 for every level", train={"seed": 1},
                  deletion_levels=(2.0, 1.0), **_MIXED_5),
    DigitsVariant("path-mixed-5-del-21-zm", "path-mixed-5 with two deletion levels (placeholder/zeros/mean): KL >= 2.0, "
                  "then KL >= 1.0 as the sparsest", deletion_levels=(2.0, 1.0), deletion_replacement="placeholder+zeros+mean",
                  **_MIXED_5),
    DigitsVariant("path-mixed-5-del-21-zm-seed-1", "path-mixed-5-del-21-zm with seed 1 for every level", train={"seed": 1},
                  deletion_levels=(2.0, 1.0), deletion_replacement="placeholder+zeros+mean", **_MIXED_5),
    DigitsVariant("path-mixed-5-del-1-zm-seed-2", "path-mixed-5-del-1-zm with seed 2 for every level", train={"seed": 2},
                  deletion_levels=(1.0,), deletion_replacement="placeholder+zeros+mean", **_MIXED_5),
    DigitsVariant("path-mixed-5-del-21-zm-seed-2", "path-mixed-5-del-21-zm with seed 2 for every level", train={"seed": 2},
                  deletion_levels=(2.0, 1.0), deletion_replacement="placeholder+zeros+mean", **_MIXED_5),
    # K = 4 (the issue's cost case): path-mixed-5 without its densest level, at the shipped probe width D/4
    # and at D/16 (4 units: the width at which K = 4 stays within 1.15x plain inference on ViT-B/16 and vit-small).
]
_MIXED_4 = {"levels": (0.1, 0.3, 1.0, 2.0), "sparse_replacement": "placeholder+zeros"}
VARIANTS += [
    DigitsVariant("path-mixed-4", "K=4, budgets 0.1/0.3/1.0/2.0: path-mixed-5 without the 0.03 level (denser levels "
                  "did not help)", **_MIXED_4),
    DigitsVariant("path-mixed-4-seed-1", "path-mixed-4 with seed 1 for every level", train={"seed": 1}, **_MIXED_4),
    DigitsVariant("path-mixed-4-seed-2", "path-mixed-4 with seed 2 for every level", train={"seed": 2}, **_MIXED_4),
    DigitsVariant("probe-4-mixed-4", "path-mixed-4 at probe width 4 (D/16) for every level",
                  train={"probe_size": 4}, **_MIXED_4),
    DigitsVariant("probe-4-mixed-4-seed-1", "probe-4-mixed-4 with seed 1 for every level",
                  train={"probe_size": 4, "seed": 1}, **_MIXED_4),
    DigitsVariant("probe-4-mixed-4-seed-2", "probe-4-mixed-4 with seed 2 for every level",
                  train={"probe_size": 4, "seed": 2}, **_MIXED_4),
    DigitsVariant("shipped-mixed-4", "path-mixed-4 around the shipped single-level gates (its main level: the path's "
                  "patch_mask is the shipped mask)", main="shipped", **_MIXED_4),
    DigitsVariant("shipped-mixed-4-seed-1", "shipped-mixed-4 with seed 1 for the other levels", main="shipped",
                  train={"seed": 1}, **_MIXED_4),
    DigitsVariant("shipped-mixed-4-seed-2", "shipped-mixed-4 with seed 2 for the other levels", main="shipped",
                  train={"seed": 2}, **_MIXED_4),
]


def _variants() -> dict:
    return {v.name: v for v in VARIANTS}


def _train_config(variant: DigitsVariant, eps: float | None = None, *, sparse_level: bool = False,
                  deletion: bool = False):
    from .config import TrainConfig
    from .recipes import GATE_CONFIGS

    kw = {**GATE_CONFIGS["digits"], **variant.train}
    if deletion:  # eps is the KL floor delta
        kw.update(variant.level_train)
        kw.update(eps=float(eps), eps_valid=0.5 * float(eps), steps=variant.level_steps, objective="delete",
                  agreement=variant.level_agreement)
        rep = variant.deletion_replacement or variant.sparse_replacement
        if rep:
            kw["replacement"] = rep
    elif eps is not None and eps != variant.eps:
        kw.update(variant.level_train)
        kw.update(eps=float(eps), eps_valid=1.5 * float(eps), steps=variant.level_steps)
        if sparse_level:
            kw["agreement"] = variant.level_agreement
            if variant.sparse_replacement:
                kw["replacement"] = variant.sparse_replacement
    kw["checkpoint_interval"] = kw["steps"]
    kw.setdefault("seed", 0)
    return TrainConfig(**kw)


def _repeated_source(pixels: torch.Tensor, samples: int):
    """A training source whose batches hold ``samples`` copies of ``batch // samples`` images (each copy
    draws its own hard-concrete noise in the step: several mask samples per image)."""
    from .loop import _TensorSource

    class Repeated(_TensorSource):
        def images(self, indices):
            idx = np.asarray(indices)
            head = idx[: max(1, len(idx) // samples)]
            return super().images(np.repeat(head, samples)[: len(idx)])

    src = Repeated(pixels)
    src.spec = f"tensor x{samples} samples"
    return src


def _fresh_gates(backbone, cfg, placeholder: str):
    from vdm_engine.gates import GateConfig, Gates

    gc = GateConfig(hidden_size=backbone.hidden_size, num_hidden_states=backbone.num_hidden_states,
                    probe_size=cfg.probe_size, mul=cfg.mul, add_init=cfg.add_init, beta=cfg.beta,
                    placeholder=placeholder == "learned")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        return Gates(gc)


#: TrainConfig fields added after levels were first cached, with their defaults: left out of the key at
#: the default, so a level trained before the field existed keeps its key.
_KEY_LATER_FIELDS = {"replacement": "placeholder", "objective": "keep"}


def _level_key(cfg, variant: DigitsVariant, placeholder: str) -> str:
    d = {k: v for k, v in cfg.to_dict().items() if _KEY_LATER_FIELDS.get(k, object()) != v}
    blob = json.dumps({"cfg": d, "samples": variant.samples, "placeholder": placeholder}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _train_one(backbone, data, variant: DigitsVariant, cfg, cache: Path | None, placeholder: str | None = None):
    """Single-level gates for one config (loaded from ``cache`` when trained before); (gates, seconds).
    ``placeholder``: ``learned`` or ``zeros`` (default the variant's)."""
    import tempfile

    from vdm_engine import Explainer
    from vdm_engine.gates import Gates

    from .loop import train_gates

    placeholder = placeholder or variant.placeholder
    where = cache / _level_key(cfg, variant, placeholder) if cache is not None else None
    if where is not None and (where / "gates_config.json").is_file():
        g = Gates.from_pretrained(where, backbone)
        return g.eval(), float(g.metrics.get("seconds", 0.0))
    train = backbone.preprocess(data["gate_train"])
    source = _repeated_source(train, variant.samples) if variant.samples > 1 else train
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="vdm-study-") as tmp:
        r = train_gates(Explainer(backbone, _fresh_gates(backbone, cfg, placeholder)), source,
                        backbone.preprocess(data["gate_val"]), cfg, out_dir=tmp, register=False, progress=False)
    seconds = round(time.time() - t0, 1)
    g = r.gates.eval()
    g.metrics = {"eps": cfg.eps, "steps": cfg.steps, "selected": "best" if r.qualified else "last",
                 "validation": r.best or r.last, "train_config": cfg.to_dict(), "samples": variant.samples,
                 "placeholder": placeholder, "seconds": seconds}
    if where is not None:
        g.save_pretrained(where, backbone=backbone, metrics=g.metrics)
    return g, seconds


def train_variant(variant: DigitsVariant, backbone, data, *, cache: Path | None = None) -> dict:
    """Train a variant's single-level gates and, with ``levels``, its K-level path gates.

    Returns:
        {"gates": Gates, "path": Gates | None, "seconds": {"main": s, "levels": [s, ...]}}; gates loaded
        from ``cache`` report the seconds their training took when they were trained (0 if not recorded).
    """
    from vdm_engine.gates import Gates

    if variant.main == "shipped":
        from vdm_engine.models import embedded_model_dir

        main = Gates.from_pretrained(embedded_model_dir("vit-digits") / "gates", backbone, source="shipped").eval()
        t_main = 0.0
    else:
        main, t_main = _train_one(backbone, data, variant, _train_config(variant), cache)
    out = {"gates": main, "path": None, "seconds": {"main": t_main}}
    if variant.levels:
        levels, secs = [], []
        for e in variant.levels:
            if e == variant.eps:
                levels.append(main)
                continue
            ph = (variant.dense_placeholder if e < variant.eps else variant.sparse_placeholder) or None
            g, s = _train_one(backbone, data, variant, _train_config(variant, e, sparse_level=e > variant.eps), cache, ph)
            levels.append(_with_placeholder_of(g, main) if ph else g)
            secs.append(s)
        for delta in variant.deletion_levels:  # the sparsest levels: their "kept" patches are the necessary ones
            ph = variant.sparse_placeholder or None
            g, s = _train_one(backbone, data, variant, _train_config(variant, delta, deletion=True), cache, ph)
            levels.append(_with_placeholder_of(g, main) if ph else g)
            secs.append(s)
        out["path"] = Gates.stack(levels, main_level=list(variant.levels).index(variant.eps)).eval()
        out["seconds"]["levels"] = secs
    return out


def _with_placeholder_of(level, main):
    """``level``'s probes in gates shaped like ``main``'s (learned or fixed placeholder), so ``Gates.stack``
    joins them; the level's own placeholder (zeros) is kept: the ranking reads only its keep probabilities."""
    from vdm_engine.gates import Gates

    if level.config.placeholder == main.config.placeholder:
        return level
    out = Gates(replace(level.config, placeholder=main.config.placeholder))
    with torch.no_grad():
        for name in ("w1", "b1", "w2", "b2", "add"):
            getattr(out, name).copy_(getattr(level, name))
        out.placeholder.copy_(level.placeholder)
    out.backbone_id, out.backbone_revision, out.backbone_fingerprint = \
        level.backbone_id, level.backbone_revision, level.backbone_fingerprint
    out.metrics = level.metrics
    return out.eval()


def _aucs(entry: dict, metric: str, setting, order: str) -> np.ndarray:
    if metric == "perturbation":
        return np.asarray(entry[setting][order]["auc_prob_per_image"])
    if metric == "insertion-deletion":
        return np.asarray(entry["insertion_deletion"][setting][order]["auc_per_image"])
    return np.asarray(entry["road"][order]["auc_per_image"])


def _curve_name(metric: str, setting, order: str) -> str:
    return f"{metric}/{setting}/{order}" if setting else f"{metric}/{order}"


def _mean_sem(a: np.ndarray) -> tuple[float, float]:
    return float(a.mean()), float(a.std(ddof=1) / math.sqrt(len(a)))


@torch.no_grad()
def score_variant(backbone, gates, path, pixel_values: torch.Tensor, chefer: torch.Tensor, *, progress: bool = False) -> dict:
    """Figures of one variant on held-out digits.

    Args:
        gates: single-level ``Gates``; path: K-level ``Gates`` or None.
        pixel_values: (M, 3, H, W) test digits; chefer: (M, N) Chefer et al. scores of them.

    Returns:
        {"mask": {kept, agreement, kl}, "methods": {name: {curve: {auc, sem, diff, diff_sem}}}} where
        ``diff`` is the mean per-image AUC difference method - Chefer.
    """
    from vdm_engine import Explainer
    from vdm_engine.attribution import get_method
    from vdm_engine.evaluation import PerturbationConfig, evaluate

    single = Explainer(backbone, gates).eval()
    e = single.explain(pixel_values)
    v = single.verify(pixel_values, e, 0.5)
    mask = {"kept": float(v.kept_fraction.mean()), "agreement": float(v.agree.float().mean()), "kl": float(v.kl.mean())}
    methods = {"diffmask": get_method("diffmask", single), CHEFER: None}
    if path is not None:
        methods["diffmask-path"] = get_method("diffmask-path", Explainer(backbone, path).eval())
    res = evaluate(methods, backbone, pixel_values, config=PerturbationConfig(), progress=progress,
                   metrics=("perturbation", "insertion-deletion", "road"), precomputed={CHEFER: chefer})
    out = _curve_figures(res)
    if path is not None:
        _, hidden = backbone.hidden_states(pixel_values)
        mask["path_kept_per_level"] = [float(x) for x in (path.level_masks(hidden) > 0.5).float().mean((0, 2))]
    return {"mask": mask, "methods": out}


def _curve_figures(res: dict, reference: str = CHEFER, paired: str | None = None) -> dict:
    """{method: {curve: {auc, sem, diff, diff_sem}}} from ``evaluate``'s result; ``diff`` is the mean per-image
    AUC difference method - ``reference``; with ``paired``, also ``diff_<paired>`` / ``diff_<paired>_sem``."""
    out = {}
    for m, entry in res["methods"].items():
        out[m] = {}
        for metric, setting, order in CURVES:
            a, c = _aucs(entry, metric, setting, order), _aucs(res["methods"][reference], metric, setting, order)
            auc, sem = _mean_sem(a)
            diff, diff_sem = _mean_sem(a - c)
            cell = {"auc": auc, "sem": sem, "diff": diff, "diff_sem": diff_sem}
            if paired is not None:
                d, ds = _mean_sem(a - _aucs(res["methods"][paired], metric, setting, order))
                cell.update({f"diff_{paired}": d, f"diff_{paired}_sem": ds})
            out[m][_curve_name(metric, setting, order)] = cell
    return out


def _rank_with_tie(level_masks: torch.Tensor, tie: torch.Tensor) -> torch.Tensor:
    """``masks.patch_rank``'s rank (1 + sparsest level keeping the patch) with another tie-break in [0, 1]."""
    return patch_rank(level_masks).floor() + tie.clamp(0.0, 1.0 - 1e-6)


def _log_keep(level_masks: torch.Tensor) -> torch.Tensor:
    return level_masks.float().clamp_min(1e-30).log()


# Candidate one-pass rankings of a path: (B, K, N) level keep probabilities, least sparse level first ->
# (B, N) scores, higher = more relevant. "path-rank" is ``masks.patch_rank`` (what diffmask-path ships).
RANKINGS = {
    "path-rank": patch_rank,
    "mean-keep": lambda p: p.float().mean(1),
    "mean-log-keep": lambda p: _log_keep(p).mean(1),
    "rank-mean-tie": lambda p: _rank_with_tie(p, p.float().mean(1)),
    "rank-geomean-tie": lambda p: _rank_with_tie(p, _log_keep(p).mean(1).exp()),
}


@torch.no_grad()
def score_rankings(backbone, path, pixel_values: torch.Tensor, chefer: torch.Tensor, *, progress: bool = False) -> dict:
    """Every ``RANKINGS`` entry of one path on held-out digits, with paired differences to Chefer and to
    ``path-rank``.

    Args:
        path: K-level ``Gates``; pixel_values: (M, 3, H, W); chefer: (M, N) Chefer et al. scores.

    Returns:
        {ranking: {curve: {auc, sem, diff, diff_sem, diff_path-rank, diff_path-rank_sem}, "target": target_check,
        "prob": {"noise/positive": (S,) mean P(original class) per removed fraction, ...}}}; Chefer's under "chefer",
        the fractions (S,) under "fractions".
    """
    from vdm_engine.evaluation import PerturbationConfig, evaluate

    _, hidden = backbone.hidden_states(pixel_values)
    p = path.level_masks(hidden)
    scores = {name: f(p).float() for name, f in RANKINGS.items()}
    res = evaluate({**{n: None for n in scores}, CHEFER: None}, backbone, pixel_values, config=PerturbationConfig(),
                   progress=progress, metrics=("perturbation", "insertion-deletion", "road"),
                   precomputed={**scores, CHEFER: chefer})
    curves = _curve_figures(res, paired="path-rank")
    # target_check reads the mask figures too; the single-level mask is not what is ranked here
    out = {}
    for name in scores:
        t = target_check({"mask": {"kept": 0.0, "agreement": 1.0}, "methods": {name: curves[name], CHEFER: curves[CHEFER]}}, name)
        t.pop("mask")  # met by construction, so "all" reads the curves only
        out[name] = {**curves[name], "target": t}
    for name in out:
        out[name]["prob"] = _perturbation_probs(res["methods"][name])
    out["fractions"] = [float(f) for f in res["fractions"]]
    out[CHEFER] = {"prob": _perturbation_probs(res["methods"][CHEFER])}
    return out


def _perturbation_probs(entry: dict) -> dict:
    return {f"{s}/{o}": [round(float(x), 4) for x in entry[s][o]["prob"]] for s in ("noise", "mean")
            for o in ("positive", "negative")}


def target_check(figures: dict, method: str = "diffmask-path") -> dict:
    """The issue's target on a variant's figures; each entry (met, by how much it is missed; 0 when met).

    Each curve against Chefer's by ``evaluation.report.level_with_best`` (most relevant first: within Chefer's
    standard error; the others: the paired 95% interval reaches 0). Mask: kept <= 0.45 and agreement >= 0.97.
    """
    from vdm_engine.evaluation.report import level_with_best

    m = figures["methods"].get(method) or figures["methods"]["diffmask"]
    c = figures["methods"][CHEFER]
    out = {}
    for metric, setting, order in CURVES:
        k = _curve_name(metric, setting, order)
        met, miss = level_with_best(order in _LOWER_BETTER, m[k]["auc"], c[k]["auc"], c[k]["sem"], m[k]["diff"],
                                    m[k]["diff_sem"])
        out[k] = {"met": met, "miss": miss}
    mk = figures["mask"]
    out["mask"] = {"met": bool(mk["kept"] <= 0.45 and mk["agreement"] >= 0.97),
                   "miss": round(max(0.0, mk["kept"] - 0.45) + max(0.0, 0.97 - mk["agreement"]), 4)}
    out["all"] = all(v["met"] for v in out.values())
    return out


def _load(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {"variants": {}}


def study(names, out: str | Path, *, cache: str | Path | None = None, progress: bool = False,
          split: str = "test") -> dict:
    """Train and score the named variants (default: all not yet in ``out/results.json``); returns the record.

    Trained levels are cached in ``cache`` (default ``out/cache``) by their settings. ``split``: the digits
    scored, ``test`` (the study) or ``val`` (200 digits neither the backbone nor the gates trained on, used only
    to select gate checkpoints by KL and agreement: a second held-out check of a recipe chosen on ``test``)."""
    from vdm_engine._io import atomic_write_json
    from vdm_engine.models import embedded_model_dir

    table = _variants()
    unknown = [n for n in names or () if n not in table]
    if unknown:
        raise ValueError(f"unknown variant {unknown[0]!r}; expected one of {', '.join(table)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    record = _load(out / "results.json")
    todo = list(names) if names else [n for n in table if n not in record["variants"]]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ViT: one thread is fastest and keeps runs reproducible
    try:
        bb, data, pv, chefer = _setup(split)
        scored = record.get("split", "test") if (record["variants"] or "shipped" in record) else split
        if scored != split:
            raise ValueError(f"{out / 'results.json'} scores the {scored!r} digits, not {split!r}: another --out")
        record.update(model="vit-digits", backbone_fingerprint=bb.fingerprint, test_images=int(len(pv)), split=split,
                      torch=torch.__version__, threads=1)
        if "shipped" not in record:  # the reference row: the gates files the package ships now
            from vdm_engine.gates import Gates
            from vdm_engine.models import embedded_levels_dir

            d = embedded_model_dir("vit-digits")
            g = Gates.from_pretrained(d / "gates", bb, source="shipped").eval()
            lv = embedded_levels_dir("vit-digits")
            p = Gates.from_pretrained(lv, bb, source="shipped").eval() if lv is not None else None
            figures = score_variant(bb, g, p, pv, chefer, progress=progress)
            record["shipped"] = {"gates_sha256": g.sha256, "levels_sha256": p.sha256 if p is not None else None,
                                 "levels_eps": p.level_budgets() if p is not None else [],
                                 **figures, "target": target_check(figures), "target_single": target_check(figures, "diffmask")}
            atomic_write_json(out / "results.json", record)
        for name in todo:
            v = table[name]
            t0 = time.time()
            trained = train_variant(v, bb, data, cache=Path(cache) if cache is not None else out / "cache")
            figures = score_variant(bb, trained["gates"], trained["path"], pv, chefer, progress=progress)
            entry = _variant_record(v, trained, figures, time.time() - t0)
            # merged into the file as it is now: studies of other variants may run beside this one
            record = {**_load(out / "results.json"), **{k: x for k, x in record.items() if k not in ("variants", "rankings")}}
            record["variants"][name] = entry
            atomic_write_json(out / "results.json", record)
            _write_markdown(record, out / "results.md")
            print(json.dumps({"variant": name, "mask": figures["mask"], "target_all": record["variants"][name]["target"]["all"],
                              "seconds": record["variants"][name]["seconds"]}), flush=True)
    finally:
        torch.set_num_threads(threads)
    return record


def _setup(split: str = "test"):
    """(backbone, training data, (M, 3, H, W) digits of ``split`` (test: the first 300), (M, N) Chefer et al.
    scores of them) of the study."""
    from vdm_engine.attribution import get_method
    from vdm_engine.backbone import load_backbone
    from vdm_engine.data import digits_split
    from vdm_engine.models import embedded_model_dir

    from .recipes import RECIPES, _data

    if split not in ("test", "val"):
        raise ValueError(f"the study scores the 'test' or 'val' digits, got {split!r}")
    bb = load_backbone(str(embedded_model_dir("vit-digits") / "backbone"))
    data = _data("digits", RECIPES["digits"])
    pv = bb.preprocess(digits_split(split)[0][:TEST_IMAGES])
    chefer = get_method(CHEFER, backbone=bb)(pv, bb(pv).argmax(-1)).detach().float()
    return bb, data, pv, chefer


def study_rankings(names, out: str | Path, *, cache: str | Path | None = None, progress: bool = False) -> dict:
    """Score every ``RANKINGS`` entry of the named path variants' gates (retrained, or from ``cache``) into
    ``out/results.json`` under ``rankings``; returns the record."""
    from vdm_engine._io import atomic_write_json

    table = _variants()
    bad = [n for n in names if n not in table or not table[n].levels]
    if bad:
        raise ValueError(f"{bad[0]!r} is not a path variant; expected one of "
                         f"{', '.join(n for n, v in table.items() if v.levels)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        bb, data, pv, chefer = _setup()
        for name in names:
            trained = train_variant(table[name], bb, data, cache=Path(cache) if cache is not None else out / "cache")
            figures = score_rankings(bb, trained["path"], pv, chefer, progress=progress)
            record = _load(out / "results.json")  # merged into the file as it is now (a study may run beside)
            record.setdefault("rankings", {})[name] = {"levels_sha256": _state_sha(trained["path"]), "rankings": figures}
            atomic_write_json(out / "results.json", record)
            _write_markdown(record, out / "results.md")
            print(json.dumps({"rankings": name, "target_all": {k: figures[k]["target"]["all"] for k in RANKINGS}}), flush=True)
    finally:
        torch.set_num_threads(threads)
    return record


def _variant_record(v: DigitsVariant, trained: dict, figures: dict, seconds: float) -> dict:
    """The results.json entry of one variant: its settings, times, validation, figures and target checks."""
    vd = asdict(v)
    vd["levels"] = list(v.levels)
    path = trained["path"]
    return {
        "variant": vd, "train_seconds": trained["seconds"], "seconds": round(seconds, 1),
        "gates_sha256": _state_sha(trained["gates"]), "validation": trained["gates"].metrics.get("validation"),
        "levels_validation": [g.get("validation") for g in path.metrics["levels"]] if path is not None else None,
        **figures, "target": target_check(figures), "target_single": target_check(figures, "diffmask"),
    }


def _state_sha(gates) -> str:
    h = hashlib.sha256()
    for k, t in sorted(gates.state_dict().items()):
        h.update(k.encode())
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _write_markdown(record: dict, path: Path) -> None:
    from vdm_engine._io import atomic_write_bytes

    short = {"perturbation/noise/positive": "pos noise", "perturbation/noise/negative": "neg noise",
             "perturbation/mean/positive": "pos mean", "perturbation/mean/negative": "neg mean",
             "insertion-deletion/noise/deletion": "del noise", "insertion-deletion/noise/insertion": "ins noise",
             "insertion-deletion/mean/deletion": "del mean", "insertion-deletion/mean/insertion": "ins mean",
             "road/positive": "ROAD MoRF", "road/negative": "ROAD LeRF"}
    split = record.get("split", "test")
    which = ("Every variant tried" if split == "test" else
             "A second held-out check of variants chosen on the test digits (`--split val`: digits neither the "
             "backbone nor the gates trained on, used only to select gate checkpoints by KL and agreement)")
    lines = [
        "# vit-digits gate recipe study" + ("" if split == "test" else f" ({split} digits)"),
        "",
        f"{which} (`python -m vdm_engine.training.recipes_digits`), on the {record.get('test_images')} "
        f"held-out {split} digits; one CPU thread (2-core AMD EPYC, shared). Mask: the single-level gates' hard mask "
        "(keep probability > 0.5). AUCs of P(original class); a cell reads `AUC (difference to Chefer ± standard "
        "error of the paired difference)`; lower is better for pos / del / MoRF, higher for neg / ins / LeRF. "
        "A star marks a curve where the issue's target is met (`target_check`).",
        "",
    ]
    lines += _summary(record, short) + [""]
    missing = [v.name for v in VARIANTS if v.name not in record["variants"]] if split == "test" else []
    if missing:
        lines += [f"Listed in `VARIANTS` but not run yet: {', '.join(missing)}.", ""]
    lines += _rankings_markdown(record, short)
    rows = _in_order(record["variants"])
    if "shipped" in record:
        rows.insert(0, ("shipped gates files", {**record["shipped"], "seconds": 0, "variant": {
            "note": f"the gates files the package shipped when this row was scored (sha256 {record['shipped']['gates_sha256'][:12]}; gates-levels "
                    f"{str(record['shipped']['levels_sha256'])[:12]}, not retrained)", "levels": record["shipped"]["levels_eps"]}}))
    for name, r in rows:
        v, mk = r["variant"], r["mask"]
        levels = f"; levels {v['levels']} kept {', '.join(f'{x:.0%}' for x in mk.get('path_kept_per_level', []))}" \
            if v["levels"] else ""
        lines += [f"## {name}", "", f"{v['note']}. Mask: kept {mk['kept']:.1%}, agreement {mk['agreement']:.1%}, "
                  f"KL {mk['kl']:.3f}{levels}; trained in {r['seconds']:.0f} s (training and scoring; cached levels count 0). "
                  f"Target met: single-level {'yes' if r['target_single']['all'] else 'no'}"
                  + (f", path {'yes' if r['target']['all'] else 'no'}" if v["levels"] else "") + ".", ""]
        lines += ["| method | " + " | ".join(short.values()) + " |", "|---|" + "---|" * len(short)]
        for m, curves in r["methods"].items():
            tgt = r["target"] if m == "diffmask-path" else r["target_single"] if m == "diffmask" else None
            cells = []
            for k in short:
                c = curves[k]
                star = "*" if tgt is not None and tgt[k]["met"] else ""
                cells.append(f"{c['auc']:.3f}" if m == CHEFER else f"{c['auc']:.3f}{star} ({c['diff']:+.3f} ± {c['diff_sem']:.3f})")
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
        lines.append("")
    atomic_write_bytes(path, ("\n".join(lines) + "\n").encode())


def _rankings_markdown(record: dict, short: dict) -> list[str]:
    """One table per path scored with ``study_rankings``: each ranking's paired difference to Chefer and to
    ``path-rank`` (what diffmask-path ships)."""
    if not record.get("rankings"):
        return []
    lines = ["## Rankings of one path", "",
             "The same K-level gates ranked several ways (`RANKINGS`, `study_rankings`): `path-rank` is "
             "`masks.patch_rank` (sparsest level keeping the patch, ties by the keep probability at the level that "
             "dropped it); `mean-keep` / `mean-log-keep` the mean over levels of the keep probability / its log; "
             "`rank-mean-tie` / `rank-geomean-tie` path-rank's level with ties by the arithmetic / geometric mean keep "
             "probability over levels. A cell reads `difference to Chefer (difference to path-rank ± its standard "
             "error)`; * = the issue's target met on that curve.", ""]
    for name, r in _in_order(record["rankings"]):
        lines += [f"### {name}", "", "| ranking | " + " | ".join(short.values()) + " | target |",
                  "|---|" + "---|" * len(short) + "---|"]
        for m in [k for k in RANKINGS if k in r["rankings"]]:
            c = r["rankings"][m]
            cells = [f"{c[k]['diff']:+.3f}{'*' if c['target'][k]['met'] else ''} "
                     f"({c[k]['diff_path-rank']:+.3f} ± {c[k]['diff_path-rank_sem']:.3f})" for k in short]
            lines.append(f"| {m} | " + " | ".join(cells) + f" | {'met' if c['target']['all'] else 'missed'} |")
        lines.append("")
    return lines


def _in_order(variants: dict) -> list:
    """(name, entry) pairs in the order of ``VARIANTS`` (the order tried), unknown names last."""
    rank = {v.name: i for i, v in enumerate(VARIANTS)}
    return sorted(variants.items(), key=lambda kv: (rank.get(kv[0], len(rank)), kv[0]))


def _summary(record: dict, short: dict) -> list[str]:
    """One row per variant: the mask, then each curve's paired difference to Chefer for the path (or the
    single-level gates without levels); the sign convention of the tables below."""
    lines = ["## Summary", "",
             f"Paired difference to Chefer (method − Chefer, mean over the {record.get('split', 'test')} digits) of the path's AUCs, or of the "
             "single-level gates' for variants without levels; negative is better in the pos / del / MoRF columns, "
             "positive in the others; * = the issue's target met on that curve.", "",
             "| variant | kept | agreement | scored | " + " | ".join(short.values()) + " | target |",
             "|---|---|---|---|" + "---|" * len(short) + "---|"]
    rows = ([("shipped gates files", record["shipped"])] if "shipped" in record else []) + _in_order(record["variants"])
    for name, r in rows:
        m = "diffmask-path" if "diffmask-path" in r["methods"] else "diffmask"
        tgt = r["target"] if m == "diffmask-path" else r["target_single"]
        cells = [f"{r['methods'][m][k]['diff']:+.3f}{'*' if tgt[k]['met'] else ''}" for k in short]
        mk = r["mask"]
        lines.append(f"| {name} | {mk['kept']:.1%} | {mk['agreement']:.1%} | {'path' if m == 'diffmask-path' else 'single'} | "
                     + " | ".join(cells) + f" | {'met' if tgt['all'] else 'missed'} |")
    return lines


def ship(name: str, cache: str | Path, model_dir: str | Path, *, levels_only: bool = False) -> dict:
    """Replace ``model_dir/gates`` (and ``gates-levels`` for a path variant) with a studied variant's gates.

    The gates are retrained (or taken from the study's cache: same settings, same seed) through the same
    ``train_variant`` path, then written with ``save_pretrained`` against the model's backbone, with the
    recipe, the held-out evaluation and the study record in their metrics. With ``levels_only`` (implied by a
    ``main="shipped"`` variant) only ``gates-levels`` is written: the single-level gates and ``metrics.json``
    stay byte-identical. Returns the new metrics (``evaluation``: the written main mask on the test digits).
    """
    from vdm_engine import Explainer
    from vdm_engine._io import atomic_write_json
    from vdm_engine.backbone import load_backbone

    from .recipes import RECIPES, _data, evaluate_digits_gates

    v = _variants()[name]
    levels_only = levels_only or v.main == "shipped"
    if levels_only and not v.levels:
        raise ValueError(f"variant {name!r} has no levels: nothing to ship with levels only")
    from vdm_engine.models import embedded_model_dir

    model_dir = Path(model_dir)
    # the package's own model folder is recorded by its name, as a user loads it
    embedded = model_dir.resolve() == embedded_model_dir("vit-digits").resolve()
    bb = load_backbone("vit-digits" if embedded else str(model_dir / "backbone"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        trained = train_variant(v, bb, _data("digits", RECIPES["digits"]), cache=Path(cache))
        gates, path = trained["gates"], trained["path"]
        evaluation = evaluate_digits_gates(Explainer(bb, path if levels_only else gates).eval())
    finally:
        torch.set_num_threads(threads)
    study = {"variant": name, "note": v.note, "record": "docs/eval/vit-digits-recipes"}
    if path is not None:
        path.metrics = {**path.metrics, "recipe_study": {**study, "levels_eps": list(v.levels)}, "evaluation": evaluation}
    if levels_only:
        path.save_pretrained(model_dir / "gates-levels", backbone=bb)
        return path.metrics
    old = json.loads((model_dir / "metrics.json").read_text())
    metrics = {**old, "evaluation": evaluation,
               "gates_training": {"selected": gates.metrics.get("selected"), "validation": gates.metrics.get("validation"),
                                  "train_config": gates.metrics.get("train_config"), "samples": v.samples,
                                  "placeholder": v.placeholder},
               "recipe_study": study}
    gates.save_pretrained(model_dir / "gates", backbone=bb, metrics=metrics)
    if path is not None:
        path.save_pretrained(model_dir / "gates-levels", backbone=bb)
    atomic_write_json(model_dir / "metrics.json", metrics)
    return metrics


def main(argv=None) -> int:
    """``python -m vdm_engine.training.recipes_digits --out DIR [--variants a,b] [--ship NAME --model-dir DIR]``."""
    from vdm_engine.cli._common import run_cli

    parser = argparse.ArgumentParser(prog="python -m vdm_engine.training.recipes_digits",
                                     description="The vit-digits gate recipe study (every variant with its figures).")
    parser.add_argument("--out", required=True, help="study folder (results.json, results.md, cache/)")
    parser.add_argument("--variants", default=None, help=f"comma-separated subset of: {','.join(_variants())}")
    parser.add_argument("--cache", default=None, help="folder of trained levels, reused by settings (default OUT/cache)")
    parser.add_argument("--ship", default=None, metavar="NAME", help="write this variant's gates into --model-dir")
    parser.add_argument("--model-dir", default=None, help="model folder to ship into (backbone/, gates/, metrics.json)")
    parser.add_argument("--levels-only", action="store_true",
                        help="with --ship: write only gates-levels (the single-level gates stay as they are)")
    parser.add_argument("--rankings", action="store_true",
                        help="score every RANKINGS entry of the --variants paths (their gates from the cache)")
    parser.add_argument("--report", action="store_true", help="only rewrite OUT/results.md from OUT/results.json")
    parser.add_argument("--split", default="test", choices=("test", "val"),
                        help="digits scored: test (the study, default) or val (a second held-out check)")
    parser.add_argument("--progress", action="store_true")
    args = parser.parse_args(argv)

    def body():
        if args.report:
            _write_markdown(_load(Path(args.out) / "results.json"), Path(args.out) / "results.md")
            return 0
        if args.ship is not None:
            if args.ship not in _variants():
                raise ValueError(f"unknown variant {args.ship!r}; expected one of {', '.join(_variants())}")
            if args.model_dir is None:
                raise ValueError("--ship needs --model-dir (e.g. vdm_engine/assets/vit-digits)")
            m = ship(args.ship, args.cache or Path(args.out) / "cache", args.model_dir, levels_only=args.levels_only)
            print(json.dumps({"shipped": args.ship, "evaluation": m["evaluation"]}))
            return 0
        names = [n.strip() for n in args.variants.split(",") if n.strip()] if args.variants else None
        if args.rankings:
            if not names:
                raise ValueError("--rankings needs --variants (path variants, e.g. path-dense-5)")
            study_rankings(names, args.out, cache=args.cache, progress=args.progress)
            return 0
        study(names, args.out, cache=args.cache, progress=args.progress, split=args.split)
        return 0

    return run_cli("recipes_digits", body)


if __name__ == "__main__":
    sys.exit(main())
