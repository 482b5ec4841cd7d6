"""Perturbation curves, areas and localisation scores."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vdm_engine.attribution import get_method
from vdm_engine.backbone import random_backbone
from vdm_engine.evaluation import (
    PerturbationConfig,
    auc,
    evaluate,
    perturb_pixels,
    perturbed_logits,
    perturbed_logits_pixels,
    prf,
    removal_counts,
    removal_gates,
    replacement_pixels,
)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models run far faster on one thread than two on a shared CPU (no spin-waiting)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_auc_hand_made_curves():
    # Trapezoids on [0, 1] with 5 points (dx = 0.25).
    assert auc([1, 1, 1, 1, 1]) == pytest.approx(1.0)
    assert auc([1.0, 0.75, 0.5, 0.25, 0.0]) == pytest.approx(0.5)
    # 0.25 * ((1+0)/2 + (0+0)/2 + (0+1)/2 + (1+1)/2) = 0.25 * 2 = 0.5
    assert auc([1, 0, 0, 1, 1]) == pytest.approx(0.5)
    # uneven abscissae: 0.1*(0+1)/2 + 0.9*(1+1)/2 = 0.95
    assert auc([0, 1, 1], x=[0.0, 0.1, 1.0]) == pytest.approx(0.95)
    np.testing.assert_allclose(auc(np.array([[0, 1], [2, 2]])), [0.5, 2.0])
    with pytest.raises(ValueError, match="at least 2 points"):
        auc([1.0])
    with pytest.raises(ValueError, match="increasing"):
        auc([1, 2, 3], x=[0, 0.5, 0.2])


def test_removal_counts_and_orders():
    assert removal_counts(16, 10) == [0, 2, 3, 5, 6, 8, 10, 11, 13, 14, 16]
    assert removal_counts(196, 10)[-1] == 196
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.3], [4.0, 3.0, 2.0, 1.0]])
    pos = removal_gates(scores, 4, "positive")
    neg = removal_gates(scores, 4, "negative")
    assert pos.shape == (2, 5, 4)
    # positive: most relevant removed first.
    assert pos[0, 1].tolist() == [1, 0, 1, 1] and pos[0, 2].tolist() == [1, 0, 0, 1]
    assert pos[1, 1].tolist() == [0, 1, 1, 1]
    # negative: least relevant first.
    assert neg[0, 1].tolist() == [0, 1, 1, 1] and neg[1, 3].tolist() == [1, 0, 0, 0]
    for g in (pos, neg):
        assert g[:, 0].eq(1).all() and g[:, -1].eq(0).all()
        # once removed, a patch stays removed
        assert (g[:, 1:] <= g[:, :-1]).all()


def test_ties_are_broken_at_random_with_a_generator():
    scores = torch.zeros(1, 16)
    plain = removal_gates(scores, 16, "positive")
    assert plain[0, 1].tolist() == [0] + [1] * 15  # patch order without a generator
    gates = removal_gates(scores.expand(64, 16), 16, "positive", torch.Generator().manual_seed(0))
    first = (1 - gates[:, 1]).argmax(-1)
    assert len(set(first.tolist())) > 4


def test_replacement_pixels(tiny_backbone, pixels):
    mean = replacement_pixels(pixels, "mean", tiny_backbone.image_spec, range(5))
    torch.testing.assert_close(mean[:, :, 3, 7], pixels.mean((2, 3)))
    a = replacement_pixels(pixels, "noise", tiny_backbone.image_spec, [1, 2, 3, 4, 5])
    b = replacement_pixels(pixels[:2], "noise", tiny_backbone.image_spec, [1, 2])
    torch.testing.assert_close(a[:2], b)  # per-image seeds: batching does not change the noise
    # mean 0.5 / std 0.5: uniform raw pixels map to [-1, 1]
    assert a.min() >= -1 and a.max() <= 1 and a.std() > 0.4
    with pytest.raises(ValueError, match="replacement"):
        replacement_pixels(pixels, "blur", tiny_backbone.image_spec, range(5))


def test_perturb_pixels_places_patches():
    pv = torch.zeros(1, 3, 32, 32)
    repl = torch.ones(1, 3, 32, 32)
    gates = torch.ones(1, 1, 16)
    gates[0, 0, 6] = 0  # row 1, column 2 of the 4x4 grid
    out = perturb_pixels(pv, repl, gates, (8, 8))[0]
    assert out[:, 8:16, 16:24].eq(1).all()
    assert out.sum() == 3 * 64


@pytest.mark.parametrize("mode", ["noise", "mean"])
def test_perturbation_via_embeddings_equals_pixels(mode, close):
    """Replacing patch pixels == replacing patch embeddings (linear patch projection), (B, K, N) gates."""
    bb = random_backbone("vit-tiny", seed=2, hidden_size=44, num_attention_heads=4, image_size=40, patch_size=8)
    pv = torch.randn(3, 3, 40, 40)  # 5x5 grid, N = 25
    repl = replacement_pixels(pv, mode, bb.image_spec, [7, 8, 9])
    gates = removal_gates(torch.randn(3, 25), 10, "positive", torch.Generator().manual_seed(0))
    gates[1, 4] = torch.rand(25)  # soft gates blend identically too
    with torch.no_grad():
        close(perturbed_logits(bb, pv, repl, gates), perturbed_logits_pixels(bb, pv, repl, gates), 1e-5, 1e-4,
              f"{mode}: embedding path vs pixel path")


def test_prf_arithmetic():
    # image 0: tp 2 fp 1 fn 0; image 1: tp 0 fp 0 fn 2; image 2: nothing relevant, nothing kept.
    r = prf([[2, 1, 0], [0, 0, 2], [0, 0, 0]])
    assert r["precision"] == pytest.approx(2 / 3) and r["recall"] == pytest.approx(0.5)
    assert r["f1"] == pytest.approx(2 * (2 / 3) * 0.5 / (2 / 3 + 0.5))
    assert r["macro_recall"] == pytest.approx(0.5)  # (1 + 0) / 2, image 2 skipped
    assert r["macro_f1"] == pytest.approx((0.8 + 0) / 2)


def test_evaluate_end_to_end(tiny_explainer, pixels):
    bb = tiny_explainer.backbone
    methods = {m: get_method(m, tiny_explainer) for m in ("diffmask", "random", "chefer")}
    relevant = torch.zeros(5, 16, dtype=torch.bool)
    relevant[:, :3] = True

    def oracle(pv, target):  # scores that rank the ground truth first
        return relevant[: pv.shape[0]].float() + 0.01 * torch.rand(pv.shape[0], 16)

    methods["oracle"] = oracle
    res = evaluate(methods, bb, pixels, relevant=relevant, config=PerturbationConfig(batch_size=2, max_rows=7),
                   kept_masks={"diffmask": lambda s: s > 0.5}, progress=False)
    assert res["n"] == 5 and len(res["fractions"]) == 11
    with torch.no_grad():
        p0 = bb(pixels).softmax(-1).max(-1).values.mean().item()
    for m, entry in res["methods"].items():
        for rp in ("noise", "mean"):
            for o in ("positive", "negative"):
                d = entry[rp][o]
                assert len(d["prob"]) == 11
                assert d["prob"][0] == pytest.approx(p0, abs=1e-5)  # nothing removed yet
                assert d["kl"][0] == pytest.approx(0.0, abs=1e-5)
                assert 0 <= d["auc_prob"] <= 1 and d["auc_kl"] >= 0
            # everything removed: the same image whatever the order
            assert entry[rp]["positive"]["prob"][-1] == pytest.approx(entry[rp]["negative"]["prob"][-1], abs=1e-6)
    loc = res["methods"]["oracle"]["localisation"]["topk"]
    assert loc["f1"] == pytest.approx(1.0)
    assert "own" in res["methods"]["diffmask"]["localisation"]
    assert res["methods"]["random"]["localisation"]["topk"]["f1"] < 1.0


def test_evaluate_is_independent_of_batching_and_other_methods(tiny_backbone, pixels):
    rnd = get_method("random", backbone=tiny_backbone)
    chefer = get_method("chefer", backbone=tiny_backbone)
    cfg = PerturbationConfig(replacements=("noise",), batch_size=5)
    a = evaluate({"random": rnd}, tiny_backbone, pixels, config=cfg, progress=False)
    b = evaluate({"chefer": chefer, "random": rnd}, tiny_backbone, pixels,
                 config=PerturbationConfig(replacements=("noise",), batch_size=2, max_rows=30), progress=False)
    for o in ("positive", "negative"):
        ra, rb = a["methods"]["random"]["noise"][o], b["methods"]["random"]["noise"][o]
        np.testing.assert_allclose(ra["prob"], rb["prob"], atol=1e-6)
        np.testing.assert_allclose(ra["kl"], rb["kl"], atol=1e-6)
    # a different seed draws different noise
    c = evaluate({"random": rnd}, tiny_backbone, pixels, config=PerturbationConfig(replacements=("noise",), seed=1),
                 progress=False)
    assert c["methods"]["random"]["noise"]["positive"]["prob"][-1] != a["methods"]["random"]["noise"]["positive"]["prob"][-1]


def test_versus_best_baseline_hand_worked():
    """The best baseline per curve (random and DiffMask's own rows excluded) and the level rule: most relevant
    first within the best's standard error, least relevant first by the paired 95% interval."""
    from vdm_engine.evaluation import level_with_best, results_markdown, versus_best_baseline

    assert level_with_best(True, 0.30, 0.26, 0.05, 0.04, 0.01) == (True, 0.0)
    assert level_with_best(True, 0.30, 0.26, 0.03, 0.04, 0.01) == (False, 0.01)
    assert level_with_best(False, 0.7, 0.8, 0.0, -0.03, 0.01) == (False, 0.0104)

    def entry(pos, neg):
        def d(per_image):
            return {"prob": [1, 0], "kl": [0, 1], "auc_prob": float(np.mean(per_image)), "auc_prob_sem": 0.0,
                    "auc_kl": 0.0, "auc_kl_sem": 0.0, "auc_prob_per_image": per_image, "auc_kl_per_image": [0.0] * 3}
        return {"noise": {"positive": d(pos), "negative": d(neg)}, "seconds_per_image": 0.001}

    res = {"n": 3, "fractions": [0.0, 1.0], "config": {"steps": 1, "replacements": ["noise"], "seed": 0},
           "methods": {"diffmask-path": entry([0.2, 0.3, 0.4], [0.7, 0.8, 0.9]),
                       "diffmask": entry([0.0, 0.0, 0.0], [1.0, 1.0, 1.0]),  # not a baseline
                       "chefer": entry([0.22, 0.26, 0.30], [0.6, 0.6, 0.6]),
                       "ig": entry([0.3, 0.3, 0.3], [0.72, 0.80, 0.94]),
                       "random": entry([0.1, 0.1, 0.1], [1.0, 1.0, 1.0])}}  # not a baseline
    pos, neg = versus_best_baseline(res, "diffmask-path")
    # positive: chefer best (0.26 ± 0.04/sqrt(3)); 0.30 - 0.26 - 0.0231 = 0.0169 short
    assert (pos["curve"], pos["best"], pos["met"]) == ("positive, noise", "chefer", False)
    assert pos["best_sem"] == pytest.approx(0.04 / np.sqrt(3)) and pos["miss"] == pytest.approx(0.0169, abs=1e-4)
    # negative: ig best (0.82); path - ig = [-0.02, 0, -0.04]: -0.02 + 1.96 * 0.02 / sqrt(3) = +0.0026 >= 0
    assert (neg["curve"], neg["best"], neg["met"], neg["miss"]) == ("negative, noise", "ig", True, 0.0)
    assert neg["diff"] == pytest.approx(-0.02) and neg["diff_sem"] == pytest.approx(0.02 / np.sqrt(3))
    md = results_markdown(res)
    assert "## DiffMask path against the best baseline of each curve" in md
    assert "| positive, noise | 0.3000 ± 0.0577 | chefer 0.2600 ± 0.0231 | +0.0400 ± 0.0346 | no (short by 0.0169) |" in md
    assert "## DiffMask against the best baseline of each curve" in md and "## Paired differences to DiffMask (" in md


def test_paired_difference_and_markdown():
    from vdm_engine.evaluation import paired_difference, results_markdown

    def entry(per_image):
        d = {"prob": [1, 0], "kl": [0, 1], "auc_prob": float(np.mean(per_image)), "auc_prob_sem": 0.0,
             "auc_kl": 0.0, "auc_kl_sem": 0.0, "auc_prob_per_image": per_image, "auc_kl_per_image": [0.0] * 3}
        return {"noise": {"positive": d, "negative": d}, "seconds_per_image": 0.001}

    res = {"n": 3, "fractions": [0.0, 1.0], "config": {"steps": 1, "replacements": ["noise"], "seed": 0},
           "methods": {"diffmask": entry([0.2, 0.4, 0.6]), "random": entry([0.5, 0.5, 0.8])}}
    mean, se = paired_difference(res, "random", "diffmask", "noise", "positive")
    assert mean == pytest.approx(0.2) and se == pytest.approx(np.std([0.3, 0.1, 0.2], ddof=1) / np.sqrt(3))
    md = results_markdown(res)
    assert "| random | perturbation, noise | +0.2000 ± 0.0577 | +0.2000 ± 0.0577 |" in md
